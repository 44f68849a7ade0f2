"""The grammar engine (llguidance) on the default model's tokenizer: refusals with the engine's reason,
and masks that only ever let a grammar's language through."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from tgi_zmq import messages as m
from tgi_zmq.config import ServerConfig
from tgi_zmq.convert import default_model_dir
from tgi_zmq.grammar import LRU, GrammarEngine, GrammarError, unpack
from tgi_zmq.messages import Grammar

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


def test_refusals_carry_the_engines_reason(engine):
    grammars, _ = engine
    with pytest.raises(GrammarError, match="unclosed group"):
        grammars.check(Grammar("regex", "a(b"))
    with pytest.raises(GrammarError, match="nonsense"):
        grammars.check(Grammar("json", json.dumps({"type": "nonsense"})))
    grammars.check(Grammar("json", json.dumps(SCHEMA)))


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


def test_a_slow_grammar_times_out_and_stays_refused(engine, monkeypatch):
    grammars = GrammarEngine(engine[1], timeout=0.2)
    builds = counting_builds(grammars, monkeypatch)
    start = time.monotonic()
    for _ in range(2):  # the tokenizer process's check, then its cached verdict
        with pytest.raises(GrammarError, match="compilation timed out after 0.2 s"):
            grammars.check(SLOW)
    compiled = grammars.compile(SLOW)  # the scheduler's: polled, never waited on
    assert not compiled.ready
    time.sleep(0.25)
    assert compiled.ready and grammars.compile(SLOW) is compiled
    for _ in range(2):
        with pytest.raises(GrammarError, match="compilation timed out after 0.2 s"):
            grammars.matcher(SLOW)
    assert time.monotonic() - start < 1.5  # nobody waited for the compiles (over 1 s each)
    assert builds == [SLOW, SLOW]  # one compile per process's cache: the refusal is not retried


def test_compiles_are_cached_by_grammar(engine, monkeypatch):
    grammars = GrammarEngine(engine[1])
    builds = counting_builds(grammars, monkeypatch)
    schema = Grammar("json", json.dumps(SCHEMA))
    grammars.check(schema)
    grammars.check(Grammar("json", json.dumps(SCHEMA)))
    with pytest.raises(GrammarError, match="unclosed group"):
        grammars.check(Grammar("regex", "a(b"))
    with pytest.raises(GrammarError, match="unclosed group"):
        grammars.check(Grammar("regex", "a(b"))
    compiled = grammars.compile(schema)
    woken = []
    compiled.on_ready(lambda: woken.append(True))
    grammars.matcher(schema)
    assert grammars.compile(Grammar("json", json.dumps(SCHEMA))) is compiled and compiled.ready and woken
    assert builds == [schema, Grammar("regex", "a(b"), schema]


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


@pytest.fixture(scope="module")
def scheduler(engine, tmp_path_factory):
    """A scheduler process's object (no workers), and the frontend's end of its 422s."""
    import zmq

    from processes.scheduler import SchedulerProcess

    limits = dict(max_batch_prefill_tokens=64, max_concurrent_requests=4, max_total_tokens=128)
    config = ServerConfig(
        str(default_model_dir()),
        "m",
        str(tmp_path_factory.mktemp("scheduler")),
        grammar_compile_timeout=0.05,
        **limits,
    )
    frontend = zmq.Context.instance().socket(zmq.PULL)
    frontend.bind(config.endpoint("frontend"))
    process = SchedulerProcess(config)
    yield process, frontend
    process.close()
    frontend.close(linger=0)


def schedule(process, rid: str, grammar: Grammar) -> None:
    params = m.SamplingParams(grammar=grammar)
    process.new_request(m.ScheduleRequest(rid, [1, 2, 3], params, 5, time.time()))


def test_the_scheduler_admits_a_request_once_its_grammar_compiled(scheduler):
    process, frontend = scheduler
    schedule(process, "fast", Grammar("regex", "ab"))
    schedule(process, "slow", SLOW)
    assert set(process.compiling) == {"fast", "slow"} and not process.policy.waiting
    assert process.wake_r in dict(process.poller.poll(2000))  # the compile's end wakes the loop
    while process.compiling:
        process.receive(timeout_ms=20)
        process.admit_compiled()
    (admitted,) = process.policy.waiting
    assert admitted.rid == "fast" and admitted.grammar is not None
    assert frontend.poll(2000)
    refused = m.decode(frontend.recv())
    assert refused.rid == "slow" and refused.message.endswith("grammar: compilation timed out after 0.05 s")


def test_an_abort_or_a_new_frontend_drops_a_request_that_waits_for_its_grammar(scheduler):
    process, frontend = scheduler
    schedule(process, "aborted", Grammar("json", json.dumps(SCHEMA)))
    schedule(process, "orphan", Grammar("regex", "ab"))  # compiled (cached): admitted on the next turn
    process.abort(m.AbortRequest("aborted"))
    assert set(process.compiling) == {"orphan"}
    process.frontend_started(m.FrontendStarted("new"))
    time.sleep(0.1)
    process.admit_compiled()
    assert not process.compiling and not process.policy.waiting
