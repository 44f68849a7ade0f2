"""Incremental detokenization and stop sequences (pure; the process loop is processes/detokenizer.py).

Each step decodes only a short window of ids (TGI's ``decode_token``): the text of
``ids[prefix:read]`` and of ``ids[prefix:]``; the difference is the new text, unless it
ends in U+FFFD, which means a multi-byte character is still incomplete and we wait for
the next token. The window starts a few tokens back so spacing rules see their
neighbours. Stop sequences are matched on the text just produced (plus the tail that a
stop could straddle); the stop text stays in the output, as in TGI.

The scheduler sends each step's tokens as a ``BatchTokenOutput`` built here (``token_output``), with
what the detokenizer needs to know of each new request (``request_info``): which of the prompt's last
ids give the first tokens their context (``PROMPT_TAIL``) is decided here alone, and only those are
sent, unless the request wants its prompt's logprobs (the whole prompt is shown then).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import TYPE_CHECKING

from tgi_zmq import messages
from tgi_zmq.errors import Fail, isolated

if TYPE_CHECKING:
    from tgi_zmq.policy import Produced, Request

log = logging.getLogger("tgi_zmq.textstream")

PROMPT_TAIL = 5  # prompt ids kept as decoding context for the first generated tokens
DECODED_KEPT = 64  # ids already turned into text kept in the window before it is cut


def token_output(produced: list[Produced], now: float) -> messages.BatchTokenOutput:
    """A step's tokens for the detokenizer (scheduler side), with the info of requests new to it."""
    out = messages.BatchTokenOutput([], [], [], [], [])
    tops = any(p.top_ids for p in produced)
    for p in produced:
        req = p.request
        if p.first:
            out.new_requests.append(request_info(req, now))
            log.info("rid=%s first token after %.3fs", req.rid, now - req.arrival_time)
        out.rids.append(req.rid)
        out.token_ids.append(p.token)
        out.logprobs.append(p.logprob)
        out.finish_reasons.append(req.finish_reason)
        if tops:
            out.top_ids.append(p.top_ids)
            out.top_logprobs.append(p.top_logprobs)
        if req.finish_reason:
            log.info("rid=%s finished: %s, %d tokens", req.rid, req.finish_reason, req.num_output)
    return out


def request_info(req: Request, now: float) -> messages.DetokRequestInfo:
    """What the detokenizer needs of a request at its first token: its prompt's tail (the first token's
    context; none for seq2seq, whose output starts afresh), or all of it with its logprobs, its stops,
    the tokens already streamed, and its stage times up to its first token (``now``), which the
    detokenizer completes."""
    if req.encoder_ids:
        prompt = []
    else:
        shown = 0 if req.params.prompt_logprobs else max(0, req.prompt_len - PROMPT_TAIL)
        prompt = req.token_ids[shown : req.prompt_len]
    scheduled = req.scheduled_time or now
    stages = messages.StageTimes(
        req.tokenize_seconds, scheduled - req.received_time, now - scheduled, 0.0, 0.0
    )
    return messages.DetokRequestInfo(
        req.rid,
        prompt,
        len(req.encoder_ids) or req.prompt_len,
        req.params.stop,
        req.token_ids[req.prompt_len : req.prompt_len + req.resumed],
        req.prompt_logprobs,
        stages,
        now,
    )


@dataclasses.dataclass
class DecodeState:
    ids: list[int]
    prefix_offset: int
    read_offset: int
    stop: list[str]
    text: str = ""  # visible text produced so far (special tokens skipped)
    generated: int = 0
    seconds: float = 0.0  # spent detokenizing its tokens (the ``detokenize`` stage)

    @classmethod
    def start(cls, prompt_ids: list[int], stop: list[str]) -> DecodeState:
        """A request's state before its first token: the prompt's tail is context, not output."""
        tail = prompt_ids[-PROMPT_TAIL:]
        return cls(list(tail), 0, len(tail), stop)


@dataclasses.dataclass
class TokenText:
    text: str  # this token's share of the visible text (may be "" while a character is incomplete)
    token_text: str  # text shown for the token itself in details (special tokens spelled out)
    special: bool
    stopped: bool  # a stop sequence ended in this token's text


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one per process, kept for its life)
    def token_text(self, token_id: int) -> str:
        """One token on its own, special tokens spelled out (TGI's text of top and prompt tokens)."""
        tokenizer = self.tokenizer
        return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_list(self, ids: list[int], logprobs: list[float | None]) -> messages.TokenList:
        texts = [self.token_text(t) for t in ids]
        return messages.TokenList(list(ids), texts, list(logprobs), [t in self.special_ids for t in ids])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, state: DecodeState, token_id: int) -> TokenText:
        """Append one token; return its new text and whether a stop sequence matched."""
        state.ids.append(token_id)
        state.generated += 1
        special = token_id in self.special_ids
        delta = self._next_text(state)
        stopped = False
        if delta and state.stop:
            delta, stopped = self._apply_stop(state, delta)
        state.text += delta
        token_text = self.tokenizer.convert_ids_to_tokens(token_id) if special else delta
        return TokenText(delta, token_text, special, stopped)

    def _next_text(self, state: DecodeState) -> str:
        prefix_text = self.decode(state.ids[state.prefix_offset : state.read_offset])
        new_text = self.decode(state.ids[state.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        state.prefix_offset = state.read_offset
        state.read_offset = len(state.ids)
        # Keep the window short: everything before prefix_offset is already text.
        if state.prefix_offset > DECODED_KEPT:
            cut = state.prefix_offset
            del state.ids[:cut]
            state.prefix_offset -= cut
            state.read_offset -= cut
        return new_text[len(prefix_text) :]

    @staticmethod
    def _apply_stop(state: DecodeState, delta: str) -> tuple[str, bool]:
        """Cut ``delta`` right after the earliest stop sequence that ends inside it."""
        best = None
        for stop in state.stop:
            tail = state.text[max(0, len(state.text) - len(stop) + 1) :]
            pos = (tail + delta).find(stop)
            if pos >= 0:
                end = pos + len(stop) - len(tail)
                if best is None or end < best:
                    best = end
        if best is None:
            return delta, False
        return delta[:best], True


class BatchDetokenizer:
    """Per-request decode states; turns a step's ``BatchTokenOutput`` into a ``BatchTextOutput``."""

    def __init__(self, tokenizer):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.states: dict[str, DecodeState] = {}
        self.infos: dict[str, messages.DetokRequestInfo] = {}

    def process(
        self, out: messages.BatchTokenOutput, fail: Fail
    ) -> tuple[messages.BatchTextOutput, list[str]]:
        """Turn one step's tokens into deltas; also return rids whose stop sequence matched. A request
        whose share raises fails alone: ``fail(rid, exc)``, and it is forgotten here (its later tokens
        are dropped) while the others get their text."""
        failed: dict[str, Exception] = {}
        for info in out.new_requests:
            with isolated(info.rid, failed.__setitem__):
                self._start(info)
        deltas: dict[str, messages.RequestDelta] = {}
        stopped = []
        tops = zip(out.top_ids, out.top_logprobs, strict=True) if out.top_ids else None
        for rid, token, logprob, reason in zip(
            out.rids, out.token_ids, out.logprobs, out.finish_reasons, strict=True
        ):
            top = next(tops) if tops is not None else None
            if rid not in self.states:  # finished by a stop sequence, aborted or failed: tokens dropped
                continue
            with isolated(rid, failed.__setitem__):
                if self._add(rid, token, logprob, reason, top, deltas):
                    stopped.append(rid)
        for rid, exc in failed.items():
            self.forget(rid)
            deltas.pop(rid, None)
            fail(rid, exc)
        stopped = [rid for rid in stopped if rid not in failed]
        return messages.BatchTextOutput(list(deltas.values())), stopped

    def _start(self, info: messages.DetokRequestInfo) -> None:
        state = self.states[info.rid] = DecodeState.start(info.prompt_ids, info.stop)
        self.infos[info.rid] = info
        for token in info.output_ids:  # a replay: rebuild the state its earlier tokens left
            self.detok.add(state, token)

    def _add(
        self,
        rid: str,
        token: int,
        logprob: float,
        reason: str | None,
        top: tuple[list[int], list[float]] | None,
        deltas: dict[str, messages.RequestDelta],
    ) -> bool:
        """One token of ``rid`` into its delta of this step; True if a stop sequence matched in it."""
        state = self.states[rid]
        started = time.perf_counter()
        delta = deltas.get(rid) or self._new_delta(rid)
        deltas[rid] = delta
        if top is not None and top[0]:
            delta.top_tokens.append(self.detok.token_list(*top))
        piece = self.detok.add(state, token)
        delta.token_ids.append(token)
        delta.token_texts.append(piece.token_text)
        delta.logprobs.append(logprob)
        delta.specials.append(piece.special)
        delta.text += piece.text
        delta.generated_tokens = state.generated
        if piece.stopped:
            reason = "stop_sequence"
        state.seconds += time.perf_counter() - started
        if reason:
            delta.finish_reason = reason
            delta.stages = self._stages(rid, state)
            self.forget(rid)
        return piece.stopped

    def _stages(self, rid: str, state: DecodeState) -> messages.StageTimes | None:
        """A finished request's stage times: the scheduler's, with ``decode`` closed now and ours."""
        info = self.infos[rid]
        if info.stages is None:
            return None
        decode = max(time.time() - info.first_token_time, 0.0)
        return dataclasses.replace(info.stages, decode=decode, detokenize=state.seconds)

    def _new_delta(self, rid: str) -> messages.RequestDelta:
        """A request's delta for this step; its first one carries the scored prompt, if asked."""
        info = self.infos[rid]
        delta = messages.RequestDelta(rid, [], [], [], [], "", None, 0, info.prompt_tokens)
        if info.prompt_logprobs:
            delta.prompt = self.detok.token_list(info.prompt_ids, info.prompt_logprobs)
            info.prompt_logprobs = []  # sent once
        return delta

    def forget(self, rid: str) -> None:
        self.states.pop(rid, None)
        self.infos.pop(rid, None)

    def forget_all(self) -> None:
        self.states.clear()
        self.infos.clear()
