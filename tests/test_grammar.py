"""The grammar engine (llguidance) on the default model's tokenizer: refusals with the engine's reason,
and masks that only ever let a grammar's language through."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from tgi_zmq.convert import default_model_dir
from tgi_zmq.grammar import LRU, GrammarEngine, GrammarError, RowMatchers, llguidance_tokenizer, unpack
from tgi_zmq.messages import Grammar, GrammarStart

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
# 3000 integer ranges: llguidance takes 1.4 s (idle) to 3 s (busy) to compile it on a 2-core Xeon.
SLOW = Grammar(
    "json",
    json.dumps({"properties": {f"p{i}": {"minimum": i, "maximum": i * 1000 + 7} for i in range(3000)}}),
)


@pytest.fixture(scope="module")
def engine():
    folder = default_model_dir()
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the default model is not converted (./scripts/setup does it)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return GrammarEngine(tokenizer), tokenizer


def verdict(grammars: GrammarEngine, grammar: Grammar) -> None:
    """Raise ``GrammarError`` if ``grammar`` does not compile (waits for the compile)."""
    grammars.compile(grammar).template()


def test_refusals_carry_the_engines_reason(engine):
    grammars, _ = engine
    with pytest.raises(GrammarError, match="unclosed group"):
        verdict(grammars, Grammar("regex", "a(b"))
    with pytest.raises(GrammarError, match="nonsense"):
        verdict(grammars, Grammar("json", json.dumps({"type": "nonsense"})))
    verdict(grammars, Grammar("json", json.dumps(SCHEMA)))


def constrained_text(engine, grammar: Grammar, seed: int) -> str:
    """Random logits, masked by the grammar, argmax'd token by token until the grammar ends."""
    grammars, tokenizer = engine
    matcher = grammars.matcher(grammar)
    rng = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(80):
        bitmask = torch.full((1, matcher.mask_words), -1, dtype=torch.int32)
        matcher.fill(bitmask, 0)
        allowed = unpack(bitmask, 49152)[0]
        token = int(torch.randn(49152, generator=rng).masked_fill(~allowed, float("-inf")).argmax())
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
        matcher.consume(token)
        if matcher.done:
            break
    return tokenizer.decode(ids)


@pytest.mark.parametrize("seed", range(4))
def test_masks_let_only_the_grammars_language_through(engine, seed):
    assert re.fullmatch(
        r"[0-9]{3}-[a-z]{2}", constrained_text(engine, Grammar("regex", "[0-9]{3}-[a-z]{2}"), seed)
    )
    value = json.loads(constrained_text(engine, Grammar("json", json.dumps(SCHEMA)), seed))
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and isinstance(value["name"], str)


def accepted(grammars: GrammarEngine, grammar: Grammar, ids: list[int]) -> int:
    """How many of ``ids`` the grammar takes, in order, from its start."""
    matcher = grammars.matcher(grammar)._matcher
    return next((n for n, token in enumerate(ids) if not matcher.consume_token(token)), len(ids))


def test_byte_level_tokens_are_read_as_the_bytes_they_decode_to(engine):
    """The default model's tokenizer (converted from its GGUF) has a decoder llguidance would read as
    plain text: "Ċ" a letter in a JSON string, which decodes to a raw newline (invalid JSON)."""
    grammars, tokenizer = engine
    ids = tokenizer.encode('{"name":"Lon don\n')
    assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["Ġdon", "Ċ"]
    assert accepted(grammars, Grammar("json", json.dumps(SCHEMA)), ids) == len(ids) - 1  # not the newline
    spaced = tokenizer.encode('{"name": "Lon don", "age":  3}')  # two spaces before 3: one too many
    assert tokenizer.decode(spaced[: accepted(grammars, Grammar("json", json.dumps(SCHEMA)), spaced)]) == (
        '{"name": "Lon don", "age": '
    )
    ids = tokenizer.encode("ab cd\nef")
    assert tokenizer.convert_ids_to_tokens(ids) == ["ab", "Ġcd", "Ċ", "ef"]
    assert accepted(grammars, Grammar("regex", "ab cd\nef"), ids) == len(ids)


def test_a_tokenizer_llguidance_would_misread_refuses_every_grammar(engine):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = json.loads(engine[1].backend_tokenizer.to_str())
    newline = {"type": "Replace", "pattern": {"String": "Ċ"}, "content": "\n"}  # llguidance skips it
    backend["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, newline]}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(backend)))
    with pytest.raises(GrammarError, match="reads .* tokens of this tokenizer differently"):
        llguidance_tokenizer(tokenizer)


def test_unpack_reads_32_tokens_a_word():
    bitmask = torch.tensor([[0b101, -1], [0, -(1 << 31)]], dtype=torch.int32)  # bit 31: the sign
    allowed = unpack(bitmask, 70)
    assert allowed.shape == (2, 70)
    assert allowed[0, :3].tolist() == [True, False, True] and allowed[0, 32:64].all()
    assert not allowed[0, 64:].any()  # past the mask: refused
    assert allowed[1].nonzero().flatten().tolist() == [63]


def counting_builds(grammars: GrammarEngine, monkeypatch) -> list[Grammar]:
    """The grammars ``grammars`` compiles from now on."""
    builds: list[Grammar] = []
    build = grammars._build
    monkeypatch.setattr(grammars, "_build", lambda grammar: builds.append(grammar) or build(grammar))
    return builds


def answers(rows: RowMatchers, expected: int, timeout: float = 5.0) -> dict[str, str]:
    """Poll ``rows.compiled()`` (as the worker's loop does) until ``expected`` announcements are answered;
    no call may wait for a compile."""
    got: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(got) < expected:
        assert time.monotonic() < deadline, f"answered: {got}"
        started = time.monotonic()
        got.update(rows.compiled())
        assert time.monotonic() - started < 0.1  # never waits for a compile
        time.sleep(0.005)
    assert not rows.pending
    return got


def test_a_slow_grammar_times_out_and_stays_refused(engine, monkeypatch):
    grammars = GrammarEngine(engine[1], timeout=0.2)
    builds = counting_builds(grammars, monkeypatch)
    rows = RowMatchers(grammars)
    start = time.monotonic()
    rows.announce("a", SLOW)
    rows.announce("fast", Grammar("regex", "ab"))
    rows.announce("b", SLOW)  # the same grammar: one compile
    timed_out = "compilation timed out after 0.2 s"
    assert answers(rows, 3) == {"a": timed_out, "fast": "", "b": timed_out}
    rows.announce("c", SLOW)  # the cached refusal: not compiled again
    assert answers(rows, 1) == {"c": timed_out}
    assert time.monotonic() - start < 1.5  # nobody waited for the compile (over 1 s)
    assert builds == [SLOW, Grammar("regex", "ab")]


def test_compiles_are_cached_by_grammar(engine, monkeypatch):
    grammars = GrammarEngine(engine[1])
    builds = counting_builds(grammars, monkeypatch)
    schema = Grammar("json", json.dumps(SCHEMA))
    compiled = grammars.compile(schema)
    assert grammars.compile(Grammar("json", json.dumps(SCHEMA))) is compiled
    for _ in range(2):
        with pytest.raises(GrammarError, match="unclosed group"):
            verdict(grammars, Grammar("regex", "a(b"))
    grammars.matcher(schema)
    assert compiled.ready and builds == [schema, Grammar("regex", "a(b")]


def test_without_an_engine_every_grammar_is_refused_with_the_reason():
    rows = RowMatchers(None)
    rows.announce("a", Grammar("regex", "ab"))
    assert answers(rows, 1) == {"a": "structured output is off on this worker"}
    failed: Future = Future()
    failed.set_exception(OSError("no tokenizer.json"))
    rows = RowMatchers(failed)
    rows.announce("b", Grammar("regex", "ab"))
    assert answers(rows, 1) == {"b": "the grammar engine failed to load: no tokenizer.json"}


def test_the_engine_loads_on_the_first_grammar_announced(engine):
    loads: list[Future] = []

    def load() -> Future:
        loads.append(Future())
        return loads[-1]

    rows = RowMatchers(load)
    assert loads == [] and not rows.pending  # a service never asked for a grammar never loads it
    rows.announce("a", Grammar("regex", "ab"))
    rows.announce("b", Grammar("regex", "a(b"))
    assert len(loads) == 1 and rows.compiled() == [] and rows.pending
    loads[0].set_result(GrammarEngine(engine[1]))
    assert answers(rows, 2)["a"] == "" and len(loads) == 1

    loads.clear()  # a step that brings a grammar never announced (a test's step) loads the engine too
    unannounced = RowMatchers(load)
    threading.Timer(0.2, lambda: loads[0].set_result(GrammarEngine(engine[1]))).start()
    unannounced.start([GrammarStart("c", 0, Grammar("regex", "ab"), [])])  # waits for the load, compiles
    (a,) = engine[1].encode("a", add_special_tokens=False)
    assert len(loads) == 1 and unannounced.advance(0, a) is False


def test_announcements_wait_for_the_engine_to_load_before_their_timeout_counts(engine):
    loading: Future = Future()
    rows = RowMatchers(loading)
    rows.announce("a", Grammar("regex", "ab"))
    time.sleep(0.3)
    assert rows.compiled() == [] and rows.pending  # the engine is still loading: no answer, no timeout
    loading.set_result(GrammarEngine(engine[1], timeout=0.25))
    assert answers(rows, 1) == {"a": ""}


def mask(matcher) -> list[int]:
    bitmask = torch.zeros((1, matcher.mask_words), dtype=torch.int32)
    matcher.fill(bitmask, 0)
    return bitmask[0].tolist()


def test_matchers_of_one_compile_are_independent_copies(engine):
    grammars, tokenizer = engine
    regex = Grammar("regex", "[0-9]-[a-z]{2}")
    start = mask(grammars.matcher(regex))
    first = grammars.matcher(regex)
    (digit,) = tokenizer.encode("7", add_special_tokens=False)
    first.consume(digit)
    assert mask(first) != start
    assert mask(grammars.matcher(regex)) == start  # the cached template never moved
    replayed = grammars.matcher(regex, [digit])  # a replay: past the tokens it streamed
    assert mask(replayed) == mask(first)


def test_lru_forgets_the_least_recently_used():
    cache = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)


def test_a_compile_that_ends_while_the_answers_are_gathered_is_answered_once():
    """``Compile.ready`` turns true on its own (the compile's thread, the deadline): a compile that
    turns ready between two looks at it must be answered, not dropped (its request would wait forever)."""

    class TurnsReady:
        looks = 0

        @property
        def ready(self) -> bool:
            self.looks += 1
            return self.looks > 1

        def template(self) -> None:
            return None

    rows = RowMatchers(None)
    rows._compiling = [("r", TurnsReady())]
    assert rows.compiled() + rows.compiled() + rows.compiled() == [("r", "")]


def test_rank_0_holds_each_requests_compile_until_it_ends(engine):
    """The cache may evict a grammar between its request's announcement and its first step (or its
    next one after a preemption): the compile held for the request starts its row, never a new compile
    inside a step; the request's end drops it."""
    grammars, tokenizer = engine
    small = GrammarEngine(tokenizer, cache_size=1)
    rows = RowMatchers(small)
    first, second = Grammar("regex", "[0-9]{3}"), Grammar("regex", "[a-z]{3}")
    rows.announce("r1", first)
    rows.announce("r2", second)  # evicts the first from the cache
    while rows.pending:
        time.sleep(0.01)
        answers = rows.compiled()
        assert all(refusal == "" for _, refusal in answers)

    def compile_again(grammar: Grammar) -> None:
        raise AssertionError("compiled inside a step")

    small.compile = compile_again
    rows.start([GrammarStart("r1", 0, first, []), GrammarStart("r2", 1, second, [])])
    assert set(rows._rows) == {0, 1}
    rows.drop([0], ["r1"])
    assert set(rows._rows) == {1} and set(rows._held) == {"r2"}
