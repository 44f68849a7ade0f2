"""Structured output through llguidance: a grammar (a JSON schema or a regex) becomes, token by token,
the set of tokens that can come next.

Why llguidance: it compiles a JSON schema in about a millisecond, fills a vocabulary mask in tens of
microseconds, and says in plain words why a grammar is refused. This module is the one place that
knows it: ``GrammarEngine.check`` compiles a request's grammar in the tokenizer process, a refusal
being a 422; ``GrammarEngine.compile`` compiles it again, in the background, for the scheduler, whose
``Compile.matcher`` copies it into the per-request ``Matcher`` (it only says when the grammar is
done). A compile runs in a thread and counts as refused past ``timeout`` seconds; each process keeps
the outcomes of the last grammars (LRU).

The masks are made where the tokens are sampled: the worker of rank 0 keeps a matcher per state row
(``RowMatchers``), started from the grammar the step that first samples for a request brings, and
advanced with the tokens it samples itself, so the scheduler may build a step before it knows the
previous one's tokens. The masks are bitmasks, 32 tokens to an int32 (llguidance's layout);
``unpack`` turns them into a boolean mask on the step's device (``sampler.VocabMask``).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

import torch

from tgi_zmq.messages import Grammar, GrammarStart

if TYPE_CHECKING:
    import llguidance


class GrammarError(ValueError):
    """The grammar cannot be used; the message is the engine's reason."""


def to_llguidance(grammar: Grammar) -> str:
    import llguidance

    if grammar.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(json.loads(grammar.value))
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
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self.mask_words = (self.tokenizer.vocab_size + 31) // 32
        self.timeout = timeout
        self._verdicts = LRU(cache_size)  # the tokenizer process's: (kind, value) -> refusal, "" if none
        self._compiles = LRU(cache_size)  # the scheduler's: (kind, value) -> Compile

    def check(self, grammar: Grammar) -> None:
        """Raise ``GrammarError`` with the engine's reason if ``grammar`` cannot be compiled in time.
        The matcher is not kept (a large grammar's takes tens of MB): only the verdict is."""
        key = (grammar.kind, grammar.value)
        verdict = self._verdicts.get(key)
        if verdict is None:
            try:
                Compile(lambda: self._build(grammar), self.timeout, self.mask_words).template()
                verdict = ""
            except GrammarError as exc:
                verdict = str(exc)
            self._verdicts.put(key, verdict)
        if verdict:
            raise GrammarError(verdict)

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
        """Compiled, refused, or past its deadline: ``matcher`` answers without waiting."""
        return self._outcome.done() or time.monotonic() >= self.deadline

    def on_ready(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the compile's thread, or now) once the compile is over."""
        self._outcome.add_done_callback(lambda _: callback())

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
        error allows every token, not none: a row of -inf logits samples NaNs (its request ends anyway)."""
        import llguidance.torch

        if self._matcher.is_error():
            bitmask[row] = -1
        else:
            llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """Nothing can follow (the grammar is complete and allows no more tokens)."""
        return self._matcher.is_stopped()


class RowMatchers:
    """The grammar matchers of the worker that samples, one per state row (``tgi_zmq.step``).

    A step brings a ``GrammarStart`` for a request's first sample in its row; after that the
    worker advances the row's matcher with the tokens it samples itself. llguidance loads over the
    model's tokenizer at the first grammar; a compile is waited for (the tokenizer process already
    compiled the grammar within its timeout; the scheduler's watchdog bounds a slow one).
    """

    def __init__(self, tokenizer_id: str, timeout: float):
        self.tokenizer_id = tokenizer_id
        self.timeout = timeout
        self._engine: GrammarEngine | None = None
        self._rows: dict[int, Matcher] = {}

    @property
    def engine(self) -> GrammarEngine:
        if self._engine is None:
            from transformers import AutoTokenizer

            self._engine = GrammarEngine(AutoTokenizer.from_pretrained(self.tokenizer_id), self.timeout)
        return self._engine

    def forget(self) -> None:
        self._rows.clear()

    def start(self, starts: Iterable[GrammarStart]) -> None:
        """Each row's matcher at its grammar's start, past the tokens its request generated so far."""
        for start in starts:
            self._rows[start.row] = self.engine.matcher(start.grammar, start.output_ids)

    def masks(self, rows: list[tuple[int, int]], num_rows: int, vocab_size: int) -> torch.Tensor:
        """[num_rows, words] int32 bitmask over ``vocab_size`` tokens: each ``(row, state row)`` gets its
        matcher's allowed tokens (none past the tokenizer's vocabulary), the other rows every token."""
        words = self.engine.mask_words
        bitmask = torch.full((num_rows, max(words, -(-vocab_size // 32))), -1, dtype=torch.int32)
        for row, state_row in rows:
            bitmask[row, words:] = 0
            self._rows[state_row].fill(bitmask[:, :words], row)
        return bitmask

    def consume(self, rows: list[tuple[int, int]], sampled: torch.Tensor) -> None:
        """Advance each ``(row, state row)``'s matcher with the token sampled in ``row`` (a host read)."""
        tokens = sampled.tolist()
        for row, state_row in rows:
            self._rows[state_row].consume(tokens[row])


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, words] int32 bitmask -> [R, vocab_size] bool (tokens past the mask's end are refused)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(bitmask.shape[0], -1)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]))
