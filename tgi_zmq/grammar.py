"""Structured output through llguidance: a grammar (a JSON schema or a regex) becomes, token by token,
the set of tokens that can come next.

Why llguidance: it compiles a JSON schema in about a millisecond, fills a vocabulary mask in tens of
microseconds, and says in plain words why a grammar is refused. This module is the one place that
knows it, and the worker that samples (rank 0) the one process that uses it: it loads the engine at
boot (in a thread: seconds), and compiles each grammar once, when the scheduler announces the request
(``RowMatchers.announce``), in a background thread, keeping the last grammars' outcomes (LRU); a
compile past ``timeout`` seconds counts as refused. The worker's loop answers each announcement
(``RowMatchers.compiled``), and the scheduler lets the request run only once it is compiled, so no
step waits for a compile (a refusal is the request's 422): rank 0 holds each request's compile until
the request ends, whatever the cache evicts meanwhile.

The masks are made where the tokens are sampled: rank 0 keeps a matcher per state row, started from
the compiled grammar by the step that first samples for a request in its row, advanced with the
tokens it samples itself (so the scheduler may build a step before it knows the previous one's
tokens), and dropped when the request leaves the row. It says which rows' grammars are done; the
scheduler ends those requests. A token the grammar refuses fails its request (never an unconstrained
answer). The masks are bitmasks, 32 tokens to an int32 (llguidance's layout);
``unpack`` turns them into a boolean mask on the step's device (``sampler.VocabMask``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

import torch

from tgi_zmq.messages import Grammar, GrammarStart

log = logging.getLogger("tgi_zmq.grammar")

if TYPE_CHECKING:
    import llguidance


class GrammarError(ValueError):
    """The grammar cannot be used; the message is the engine's reason."""


# Between JSON tokens at most one space, as TGI's outlines allowed: a small model given free whitespace
# can spend its tokens on newlines. A schema's own "x-guidance" settings win.
JSON_DEFAULTS = {"whitespace_pattern": "[ ]?"}


def to_llguidance(grammar: Grammar) -> str:
    import llguidance

    if grammar.kind == "json":
        schema = json.loads(grammar.value)
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
    if grammar.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(grammar.value)
    raise GrammarError(f"unknown grammar type {grammar.kind!r}")


def reason(error: str) -> str:
    """The engine's error in one line: its first lines say what and where, the rest draws a caret."""
    lines = [line.strip() for line in error.splitlines() if line.strip(" ^|0123456789")]
    return " ".join(lines[:3])[:300]


class LRU:
    """A dict that forgets its least recently used entries past ``size``."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
        return self._items.get(key)

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.size:
            self._items.popitem(last=False)


class GrammarEngine:
    """llguidance over one tokenizer (a ``transformers`` tokenizer). A compile past ``timeout`` seconds
    refuses its grammar; the last ``cache_size`` grammars' outcomes are kept, a refusal included."""

    def __init__(self, tokenizer, timeout: float = 10.0, cache_size: int = 64):
        self.tokenizer = llguidance_tokenizer(tokenizer)
        self.mask_words = (self.tokenizer.vocab_size + 31) // 32
        self.timeout = timeout
        self._compiles = LRU(cache_size)  # (kind, value) -> Compile

    def compile(self, grammar: Grammar) -> Compile:
        """``grammar`` compiling in the background, or compiled (or refused) already."""
        key = (grammar.kind, grammar.value)
        compiled = self._compiles.get(key)
        if compiled is None:
            compiled = Compile(lambda: self._build(grammar), self.timeout, self.mask_words)
            self._compiles.put(key, compiled)
        return compiled

    def matcher(self, grammar: Grammar, generated: Iterable[int] = ()) -> Matcher:
        """A matcher at its start, then past the ``generated`` tokens; waits for the compile."""
        return self.compile(grammar).matcher(generated)

    def _build(self, grammar: Grammar) -> llguidance.LLMatcher:
        """The grammar's ``LLMatcher`` at its start (llguidance drops the GIL while it compiles)."""
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, to_llguidance(grammar))
        if matcher.is_error():
            raise GrammarError(reason(matcher.get_error()))
        return matcher


def llguidance_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's reading of ``tokenizer`` (a fast ``transformers`` tokenizer), checked token by token
    against the tokenizer's own decoding (``GrammarError`` where a token reads differently).

    llguidance tells a byte-level vocabulary ("Ġ" a space, "Ċ" a newline) by its decoder alone.
    transformers' GGUF loader writes such tokenizers with a SentencePiece-style decoder sequence
    (ByteFallback, Fuse, Replace, ByteLevel), which llguidance reads as plain text: "Ċ" would be a letter,
    and a JSON string could hold a raw newline. Such a tokenizer is handed over with its ByteLevel
    decoder alone, which decodes every token the same (the check proves it)."""
    import llguidance

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    for key in ("padding", "truncation"):
        backend[key] = None
    decoders = (backend.get("decoder") or {}).get("decoders") or []
    byte_level = [d for d in decoders if d.get("type") == "ByteLevel"]
    if byte_level:  # were it wrong for some tokenizer, the check below refuses it
        backend["decoder"] = byte_level[0]
        backend["model"]["byte_fallback"] = False
    reading = llguidance.LLTokenizer(json.dumps(backend), eos_token=tokenizer.eos_token_id)
    misread = misread_tokens(reading, tokenizer)
    if misread:
        shown = ", ".join(f"{tokenizer.decode([i])!r} as {reading.decode_bytes([i])!r}" for i in misread[:2])
        raise GrammarError(f"llguidance reads {len(misread)} tokens of this tokenizer differently ({shown})")
    return reading


def misread_tokens(reading: llguidance.LLTokenizer, tokenizer) -> list[int]:
    """The ids whose bytes in llguidance's ``reading`` differ from the tokenizer's decoding of the token
    alone (tokens that decode to part of a UTF-8 character, shown as U+FFFD, are not compared)."""
    backend = tokenizer.backend_tokenizer
    misread = []
    for token in range(min(reading.vocab_size, backend.get_vocab_size(with_added_tokens=True))):
        text = backend.decode([token], skip_special_tokens=False)
        if "\ufffd" not in text and reading.decode_bytes([token]) != text.encode():
            misread.append(token)
    return misread


def load_engine(tokenizer_id: str, timeout: float) -> Future[GrammarEngine]:
    """The engine over ``tokenizer_id``'s tokenizer, loading in a daemon thread (transformers, llguidance
    and its index of the vocabulary: seconds, which a worker's boot does not wait for)."""
    loaded: Future[GrammarEngine] = Future()

    def load() -> None:
        try:
            from transformers import AutoTokenizer

            loaded.set_result(GrammarEngine(AutoTokenizer.from_pretrained(tokenizer_id), timeout))
        except Exception as exc:  # every grammar is refused with this reason
            log.warning("structured output is unavailable: the grammar engine failed to load: %s", exc)
            loaded.set_exception(exc)
        finally:
            release_freed_memory()

    threading.Thread(target=load, daemon=True, name="grammar-load").start()
    return loaded


def release_freed_memory() -> None:
    """Hand the loading's garbage back to the system: the tokenizer, its JSON and the check's strings
    (hundreds of MB for a 262k vocabulary) were freed into this thread's malloc arena, which glibc keeps
    (Gemma 3 270M's worker: 1.41 GB resident with the engine loaded, 612 MB without)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Compile:
    """One grammar compiling in a daemon thread (a slow compile never holds up a process's exit). Its
    outcome is the ``LLMatcher`` at the grammar's start, a template that is copied and never advanced,
    or the reason it is refused: the engine's, or a timeout ``timeout`` seconds after the start."""

    def __init__(self, build: Callable[[], llguidance.LLMatcher], timeout: float, mask_words: int):
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.mask_words = mask_words
        self._outcome: Future[llguidance.LLMatcher | str] = Future()  # a str: the refusal
        threading.Thread(target=self._run, args=(build,), daemon=True, name="grammar-compile").start()

    def _run(self, build: Callable[[], llguidance.LLMatcher]) -> None:
        try:
            outcome = build()
        except Exception as exc:  # whatever stops the engine refuses the grammar, with its words
            outcome = str(exc) or type(exc).__name__
        self._settle(outcome)

    def _settle(self, outcome: llguidance.LLMatcher | str) -> None:
        try:
            self._outcome.set_result(outcome)
        except InvalidStateError:  # the compile and the timeout raced: the first one stands
            pass

    @property
    def ready(self) -> bool:
        """Compiled, refused, or past its deadline: ``template`` answers without waiting."""
        return self._outcome.done() or time.monotonic() >= self.deadline

    def template(self) -> llguidance.LLMatcher:
        """The compiled ``LLMatcher``, waiting up to the deadline; ``GrammarError`` if refused."""
        try:
            outcome = self._outcome.result(timeout=max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            # A thread cannot be killed: the compile runs on, unseen, until llguidance's own limits
            # (lexer fuel, grammar size) end it. The refusal stands: this grammar is not compiled again.
            self._settle(f"compilation timed out after {self.timeout:g} s")
            outcome = self._outcome.result()
        if isinstance(outcome, str):
            raise GrammarError(outcome)
        return outcome

    def matcher(self, generated: Iterable[int] = ()) -> Matcher:
        """A fresh matcher at the grammar's start, then past the ``generated`` tokens (a replay's)."""
        matcher = Matcher(self.template().deep_copy(), self.mask_words)
        for token in generated:
            matcher.consume(token)
        return matcher


class Matcher:
    """Where one request is in its grammar."""

    def __init__(self, matcher, mask_words: int):
        self._matcher = matcher
        self.mask_words = mask_words

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (int32, 32 tokens a word). A matcher in
        error allows every token, not none: a row of -inf logits samples NaNs (its request ends anyway).

        The matcher writes the row itself, as ``llguidance.torch.fill_next_token_bitmask`` has it do; that
        module is not imported: its ``torch.compile`` decorator loads dynamo and sympy (116 MB a worker)."""
        words = bitmask[row]
        if self._matcher.is_error():
            words.fill_(-1)
        else:
            assert words.dtype == torch.int32 and words.is_cpu and words.is_contiguous()
            self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def consume(self, token: int) -> None:
        """Take ``token``; ``GrammarError`` if the grammar refuses it (then the request fails: it must
        not go on unconstrained)."""
        if not self._matcher.consume_token(token) or self._matcher.is_error():
            raise GrammarError(f"the grammar refuses token {token}")

    @property
    def done(self) -> bool:
        """Nothing can follow (the grammar is complete and allows no more tokens)."""
        return self._matcher.is_stopped()


EngineLoader = Callable[[], Future[GrammarEngine]]  # starts loading the engine (``load_engine``)


class RowMatchers:
    """The grammars of the worker that samples (rank 0): their compiles, announced by the scheduler, and
    a matcher per state row (``tgi_zmq.step``).

    ``engine`` is the grammar engine, loaded or loading (``load_engine``), or what starts its load when
    the first grammar is announced; None where grammars are off (``--disable-grammar-support``, ranks
    other than 0): every announced grammar is refused.

    The worker loads it on demand, as vLLM does its grammar backend: a service that is never asked for
    a grammar does not hold llguidance's reading of the vocabulary (Gemma 3's 262k tokens: about 400 MB
    resident). The first grammar waits for the load (seconds); its compile timeout counts from there.
    """

    def __init__(self, engine: GrammarEngine | Future[GrammarEngine] | EngineLoader | None):
        if isinstance(engine, GrammarEngine):
            engine, loaded = Future(), engine
            engine.set_result(loaded)
        self._load = engine if callable(engine) else None
        self._engine: Future[GrammarEngine] | None = None if callable(engine) else engine
        self._announced: list[tuple[str, Grammar]] = []  # waiting for the engine to load
        self._compiling: list[tuple[str, Compile]] = []
        self._refused: list[tuple[str, str]] = []  # without an engine: (rid, why)
        # Each announced request's compile until it ends (``drop``): its first step, or
        # its next one after a preemption, never compiles again, whatever the cache evicted meanwhile.
        self._held: dict[str, Compile] = {}
        self._rows: dict[int, Matcher] = {}

    @property
    def engine(self) -> GrammarEngine:
        """The engine (starts its load if needed and waits for it; ``GrammarError`` without one)."""
        self._start_loading()
        if self._engine is None:
            raise GrammarError("structured output is off on this worker")
        try:
            return self._engine.result()
        except Exception as exc:
            raise GrammarError(f"the grammar engine failed to load: {exc}") from None

    # ------------------------------------------------------------------ compiles

    def announce(self, rid: str, grammar: Grammar) -> None:
        """Compile ``grammar`` for request ``rid`` in the background (``compiled`` says when it is)."""
        self._start_loading()
        self._announced.append((rid, grammar))
        self._start_compiles()

    def _start_loading(self) -> None:
        if self._engine is None and self._load is not None:
            log.info("the first grammar: loading the grammar engine")
            self._engine = self._load()

    @property
    def pending(self) -> bool:
        """Announced grammars are not answered yet (the worker's loop polls ``compiled`` meanwhile)."""
        return bool(self._announced or self._compiling or self._refused)

    def compiled(self) -> list[tuple[str, str]]:
        """``(rid, refusal)`` of the announced grammars compiled (refusal "") or refused since the last
        call; one past the compile timeout is refused now. Never waits."""
        self._start_compiles()
        done, pending = [], []
        for rid, compiled in self._compiling:  # one look at each: ``ready`` may turn true meanwhile
            (done if compiled.ready else pending).append((rid, compiled))
        self._compiling = pending
        answers, self._refused = self._refused, []
        for rid, compiled in done:
            try:
                compiled.template()
                answers.append((rid, ""))
            except GrammarError as exc:
                answers.append((rid, str(exc)))
        return answers

    def _start_compiles(self) -> None:
        """Start the announced grammars' compiles once the engine is loaded (the timeout counts from
        there): refused at once if it cannot load."""
        if not self._announced or (self._engine is not None and not self._engine.done()):
            return
        announced, self._announced = self._announced, []
        try:
            engine = self.engine
        except GrammarError as exc:
            self._refused += [(rid, str(exc)) for rid, _ in announced]
            return
        for rid, grammar in announced:
            try:
                self._held[rid] = compiled = engine.compile(grammar)
            except Exception as exc:  # one grammar that cannot even start compiling is refused alone
                log.exception("rid=%s: its grammar's compile did not start", rid)
                self._refused.append((rid, f"the grammar could not be compiled ({type(exc).__name__})"))
            else:
                self._compiling.append((rid, compiled))

    # ------------------------------------------------------------------ rows

    def forget(self) -> None:
        """Drop every row's matcher and held compile (a new scheduler starts afresh, its requests under
        new rids; the compiles go on: their answers go to whichever scheduler is there, which ignores
        the requests it does not know)."""
        self._rows.clear()
        self._held.clear()

    def drop(self, rows: list[int], rids: list[str]) -> None:
        """Drop the matchers of ``rows`` (their requests left them) and the compiles held for ``rids``
        (their requests ended)."""
        for row in rows:
            self._rows.pop(row, None)
        for rid in rids:
            self._held.pop(rid, None)

    def start(self, starts: list[GrammarStart]) -> None:
        """Start each row's matcher at its grammar's start, past the tokens its request generated so far,
        from the compile held since its request was announced. A matcher that cannot start leaves its row
        without one: that row fails alone (``masks`` raises for it)."""
        for start in starts:
            self._rows.pop(start.row, None)
            compiled = self._held.get(start.rid)
            if compiled is None:  # not announced to this worker (a test's step, or a scheduler's bug)
                log.warning("rid=%s: its grammar was not announced: compiled inside a step", start.rid)
                compiled = self.engine.compile(start.grammar)
            try:
                self._rows[start.row] = compiled.matcher(start.output_ids)
            except Exception:
                log.exception("row %d: its grammar's matcher cannot start", start.row)

    def masks(self, rows: list[tuple[int, int]], num_rows: int, vocab_size: int) -> torch.Tensor:
        """[num_rows, words] int32 bitmask over ``vocab_size`` tokens: each ``(row, state row)`` gets its
        matcher's allowed tokens (none past the tokenizer's vocabulary), the other rows every token."""
        words = self.engine.mask_words
        bitmask = torch.full((num_rows, max(words, -(-vocab_size // 32))), -1, dtype=torch.int32)
        for row, state_row in rows:
            bitmask[row, words:] = 0
            self._rows[state_row].fill(bitmask[:, :words], row)
        return bitmask

    def advance(self, state_row: int, token: int) -> bool:
        """The row's matcher takes its sampled ``token``; True when its grammar allows nothing more."""
        matcher = self._rows[state_row]
        matcher.consume(token)
        return matcher.done


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, words] int32 bitmask -> [R, vocab_size] bool (tokens past the mask's end are refused)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(bitmask.shape[0], -1)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]))
