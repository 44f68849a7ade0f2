"""Structured output through llguidance: a grammar (a JSON schema or a regex) becomes, token by token,
the set of tokens that can come next.

Why llguidance: it compiles a JSON schema in about a millisecond, fills a vocabulary mask in tens of
microseconds, and says in plain words why a grammar is refused. This module is the one place that
knows it: ``GrammarEngine.check`` validates a request's grammar (in the tokenizer process, off the
scheduler's loop), ``GrammarEngine.matcher`` makes the per-request ``Matcher`` the scheduler keeps.

The masks are bitmasks, 32 tokens to an int32 (llguidance's layout); ``unpack`` turns them into a
boolean mask on the step's device (``sampler.VocabMask``).
"""

from __future__ import annotations

import functools
import json

import torch

from tgi_zmq.messages import Grammar


class GrammarError(ValueError):
    """The grammar cannot be used; the message is the engine's reason."""


def to_llguidance(grammar: Grammar) -> str:
    import llguidance

    if grammar.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(json.loads(grammar.value))
    if grammar.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(grammar.value)
    raise GrammarError(f"unknown grammar type {grammar.kind!r}")


class GrammarEngine:
    """llguidance over one tokenizer (a ``transformers`` tokenizer)."""

    def __init__(self, tokenizer):
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self.mask_words = (self.tokenizer.vocab_size + 31) // 32

    def check(self, grammar: Grammar) -> None:
        """Raise ``GrammarError`` with the engine's reason if ``grammar`` cannot be compiled."""
        self._check(grammar.kind, grammar.value)

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one engine per process, kept for its life)
    def _check(self, kind: str, value: str) -> None:
        import llguidance

        grammar = Grammar(kind, value)
        try:
            error = llguidance.LLMatcher.validate_grammar(to_llguidance(grammar), self.tokenizer)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise GrammarError(str(exc)) from exc
        if error:  # the first lines say what and where; the rest draws a caret under it
            lines = [line.strip() for line in error.splitlines() if line.strip(" ^|0123456789")]
            raise GrammarError(" ".join(lines[:3])[:300])

    def matcher(self, grammar: Grammar, generated: list[int] = ()) -> Matcher:
        """A matcher at its start, then past the ``generated`` tokens (a replayed request's)."""
        import llguidance

        matcher = Matcher(llguidance.LLMatcher(self.tokenizer, to_llguidance(grammar)), self.mask_words)
        for token in generated:
            matcher.consume(token)
        return matcher


class Matcher:
    """Where one request is in its grammar."""

    def __init__(self, matcher, mask_words: int):
        self._matcher = matcher
        self.mask_words = mask_words
        if matcher.is_error():
            raise GrammarError(matcher.get_error())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (int32, 32 tokens a word)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """Nothing can follow (the grammar is complete and allows no more tokens)."""
        return self._matcher.is_stopped()


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, words] int32 bitmask -> [R, vocab_size] bool (tokens past the mask's end are refused)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(bitmask.shape[0], -1)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]))
