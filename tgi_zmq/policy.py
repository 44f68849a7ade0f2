"""Continuous batching policy: which tokens of which requests run in the next forward pass.

A request has two counters (vLLM v1's idea): ``num_tokens`` (prompt + generated) and
``num_computed`` (tokens whose KV is already in the cache). Every step closes the gap,
so prefill, chunked prefill, decode and recompute after preemption are one rule:
a scheduled request runs ``min(gap, budget)`` tokens, and samples a token when its gap
is closed. Pure Python: the process loop lives in ``processes/scheduler.py``.

Overlap: ``schedule`` advances the counters at once and appends a *placeholder* for each
token the step will sample (``-(1 + its row among the step's samples)``), so the next step
can be scheduled before this one's result is known; the worker replaces a placeholder by
the token it sampled for that row in the step before. ``update`` later writes the real
token in its place. At most one step's placeholders are unresolved at any time.

Encoder-decoder models (T5): ``token_ids`` is the decoder's sequence (it starts with the
decoder start token) and ``encoder_ids`` the prompt. The step that runs a request's first
decoder token also runs its encoder, whose K/V go into ``cross_blocks``, pages taken from
the same pool as the decoder's and freed with them. Their prefix is not cached (the decoder
blocks depend on the encoder input too).

Sliding windows (a model whose every layer has one): a request's pages that its window has passed go
back to the pool as soon as they are registered (``_free_behind_window``), so a long request holds
about ``window`` tokens of pages, and admission (which takes pages step by step) fits more requests.

Lifecycle: a request's ``status`` (``RequestStatus``, vLLM's idea) says where it is; while it runs it
holds a state row in the workers (``RowState``, given and taken back here alone).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from collections import deque
from typing import NamedTuple

from tgi_zmq.block_manager import BlockManager
from tgi_zmq.messages import SamplingParams, ScheduleRequest

log = logging.getLogger("tgi_zmq.policy")

# Prompt tokens scored per step, all the requests that score their prompt together: each is a row of
# [rows, vocab] float32 logits (512 rows of a 152k vocabulary: 311 MB).
MAX_SCORED_ROWS = 512
# A prompt chunk that runs beside decodes makes their step this many times a decode-only step at most
# (the streams' worst gap while a long prompt comes in), and has at least MIN_MIXED_CHUNK tokens.
MIXED_STEP_RATIO = 2.5
MIN_MIXED_CHUNK = 16
# ... unless this many waiting requests per decoding one wait (TGI's --waiting-served-ratio): then
# prompts take the whole step budget, as a burst of arrivals fills the batch at once.
WAITING_SERVED_RATIO = 1.2


class RequestStatus(enum.Enum):
    """Where a request is (vLLM's ``RequestStatus``); it moves only by the policy's methods."""

    WAITING = "waiting"  # in the queue for its first step
    WAITING_FOR_GRAMMAR = "waiting for its grammar"  # in the queue, passed over until the workers compiled it
    RUNNING = "running"  # has pages and a state row; runs in every step it fits in
    PREEMPTED = "preempted"  # back in the queue, pages freed, to recompute (room made, or the workers lost)
    FINISHED = "finished"  # ``finish_reason`` says why; pages freed


@dataclasses.dataclass
class RowState:
    """A running request's row in the workers' per-request state (page tables, penalty counts, grammar
    matcher: ``tgi_zmq.step``), and what the workers already hold there. A new one each time the
    request enters ``running``; ``tgi_zmq.step.build_step`` records what it sends."""

    index: int
    pages_sent: int = 0
    freed_sent: int = 0  # leading pages the workers know are freed (their entries are the null page)
    cross_pages_sent: int = 0
    history_sent: bool = False
    grammar_sent: bool = False


@dataclasses.dataclass(eq=False)
class Request:
    """One request in the scheduler: its tokens, its pages, and where it is (``status``)."""

    rid: str
    token_ids: list[int]  # the prompt, then every generated token
    params: SamplingParams
    max_new_tokens: int
    arrival_time: float = 0.0
    prompt_len: int = -1
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # once finished
    num_computed: int = 0
    blocks: list[int] = dataclasses.field(default_factory=list)
    freed_blocks: int = 0  # leading blocks given back behind the sliding window (``BlockManager.NULL_BLOCK``)
    hashed_blocks: int = 0  # leading blocks already registered in the prefix cache
    parent_hash: int = 0  # prefix-cache hash of the last of them
    epoch: int = 0  # bumped at each preemption: results of steps scheduled before it are stale
    row: RowState | None = None  # while running
    scheduled_time: float | None = None  # first step (for the queue-duration metric)
    received_time: float = 0.0  # when the scheduler got it (its ``queue`` stage starts)
    tokenize_seconds: float = 0.0  # the tokenizer's time on it (``messages.StageTimes``)
    encoder_ids: list[int] = dataclasses.field(default_factory=list)  # seq2seq (T5): the encoder's input
    cross_blocks: list[int] = dataclasses.field(default_factory=list)  # pages of the encoder's K/V
    resumed: int = 0  # output tokens it arrived with (a replay after a fault): already streamed
    faults: int = 0  # worker losses it was running through (it recomputes after each)
    prompt_logprobs: list[float | None] = dataclasses.field(default_factory=list)  # if asked, by position

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if self.prompt_len < 0:
            self.prompt_len = len(self.token_ids)
        if self.params.prompt_logprobs and not self.prompt_logprobs:
            self.prompt_logprobs = [None] * self.prompt_len

    @classmethod
    def from_schedule(cls, msg: ScheduleRequest, decoder_start: int | None = None) -> Request:
        """A request as the tokenizer sends it: a replay arrives with the tokens it already streamed
        after its prompt; for an encoder-decoder model (``decoder_start`` set) the prompt feeds the
        encoder and the decoder starts from that token."""
        common = dict(
            params=msg.params,
            max_new_tokens=msg.max_new_tokens,
            arrival_time=msg.arrival_time,
            resumed=len(msg.output_ids),
            received_time=time.time(),
            tokenize_seconds=msg.tokenize_seconds,
        )
        if decoder_start is None:
            return cls(msg.rid, msg.input_ids + msg.output_ids, prompt_len=len(msg.input_ids), **common)
        tokens = [decoder_start, *msg.output_ids]
        return cls(msg.rid, tokens, prompt_len=1, encoder_ids=list(msg.input_ids), **common)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


class Produced(NamedTuple):
    """A token a request received from a step, and the most likely tokens it was chosen among."""

    request: Request
    token: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]
    first: bool  # the first token it got here (after a replay's streamed ones)


@dataclasses.dataclass
class ScheduledBatch:
    """One step: the requests, where each starts and how many new tokens it runs."""

    requests: list[Request] = dataclasses.field(default_factory=list)
    starts: list[int] = dataclasses.field(default_factory=list)
    num_new: list[int] = dataclasses.field(default_factory=list)
    sample_slots: list[int] = dataclasses.field(default_factory=list)  # token index it samples, or -1
    epochs: list[int] = dataclasses.field(default_factory=list)
    encodes: list[bool] = dataclasses.field(default_factory=list)  # runs its encoder this step (T5)
    num_samples: int = 0
    admitted: int = 0  # requests taken in from the queue

    @property
    def is_decode(self) -> bool:
        """Every request runs one token over a cached context: the rule the attention uses per row."""
        return all(n == 1 and start > 0 for start, n in zip(self.starts, self.num_new, strict=True))

    def scored_prompt(self) -> list[tuple[int, int, int]]:
        """``(request index, first position, count)`` of the prompt positions this step scores for
        requests that want their prompt's logprobs: position p scores prompt token p + 1."""
        out = []
        for i, (req, start, n) in enumerate(zip(self.requests, self.starts, self.num_new, strict=True)):
            end = min(start + n, req.prompt_len - 1)
            if req.params.prompt_logprobs and end > start:
                out.append((i, start, end - start))
        return out

    def samples(self) -> list[bool]:
        """Which requests sample a token this step (their gap closes)."""
        return [slot >= 0 for slot in self.sample_slots]

    def add(self, req: Request, n: int) -> None:
        """Record ``req`` running ``n`` tokens; advance it and reserve its sampled token's place."""
        self.requests.append(req)
        self.encodes.append(bool(req.encoder_ids) and req.num_computed == 0)
        self.starts.append(req.num_computed)
        self.num_new.append(n)
        self.epochs.append(req.epoch)
        req.num_computed += n
        if req.num_computed == req.num_tokens:
            self.sample_slots.append(req.num_tokens)
            req.token_ids.append(-1 - self.num_samples)  # placeholder: "row num_samples of this step"
            self.num_samples += 1
        else:
            self.sample_slots.append(-1)


@dataclasses.dataclass
class StepCosts:
    """What steps cost on the workers (their measured times), to size the prompt chunks that run
    beside decodes: the device's speed is measured, not assumed per CPU kind.

    The first chunk beside decodes is sized from the cost of a prompt token in a prefill step; then
    each mixed step's time corrects it (times the target over the time, at most 2x either way): a
    chunk's cost is not proportional to its tokens (small chunks pay per-call and prefix-reading
    costs), so feedback converges where a per-token estimate would shrink chunks to nothing.
    """

    decode_seconds: float | None = None  # a step of decodes only (moving average, current batch)
    token_seconds: float | None = None  # a prompt token's share of a prefill-only step
    chunk: int | None = None  # tokens of the next chunk beside decodes

    def observe(self, batch: ScheduledBatch, seconds: float) -> None:
        prompt = sum(n for n in batch.num_new if n > 1)
        decodes = len(batch.num_new) - sum(1 for n in batch.num_new if n > 1)
        if not prompt:
            self.decode_seconds = _average(self.decode_seconds, seconds)
        elif not decodes:
            self.token_seconds = _average(self.token_seconds, seconds / prompt)
        elif self.decode_seconds and self.chunk:
            target = MIXED_STEP_RATIO * self.decode_seconds
            self.chunk = max(MIN_MIXED_CHUNK, int(self.chunk * min(2.0, max(0.5, target / seconds))))

    def mixed_chunk(self, cap: int) -> int:
        """Prompt tokens a step with decodes may run: its cost about ``MIXED_STEP_RATIO`` decode steps."""
        if self.chunk is None:
            if not self.decode_seconds or not self.token_seconds:
                return cap
            self.chunk = int((MIXED_STEP_RATIO - 1) * self.decode_seconds / self.token_seconds)
        self.chunk = max(MIN_MIXED_CHUNK, min(cap, self.chunk))
        return self.chunk


def _average(old: float | None, new: float, weight: float = 0.2) -> float:
    return new if old is None else (1 - weight) * old + weight * new


class SchedulePolicy:
    def __init__(
        self,
        block_manager: BlockManager,
        max_step_tokens: int,
        max_running: int,
        eos_token_ids: tuple[int, ...],
        max_total_tokens: int,
    ):
        self.block_manager = block_manager
        self.max_step_tokens = max_step_tokens
        self.max_running = max_running
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_total_tokens = max_total_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_rows = list(range(max_running - 1, -1, -1))  # state rows, lowest handed out first
        self.grammar_ends: list[int] = []  # rows whose matchers the workers drop (``take_grammar_drops``)
        self.grammar_releases: list[str] = []  # ended requests whose compiles the workers drop
        self.to_compile: list[Request] = []  # grammars the workers are to compile (``take_grammars``)
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0  # prompt tokens looked up (vLLM's prefix-cache queries)
        self.queue_waits: list[float] = []  # seconds from arrival to first step, drained by the stats
        self.costs = StepCosts()  # fed by the engine with each step's time

    # ------------------------------------------------------------------ arrivals and departures

    def add(self, request: Request) -> None:
        """Queue ``request``; one with a grammar waits until the workers compiled it (``take_grammars``,
        ``grammar_compiled``)."""
        if request.params.grammar is None:
            request.status = RequestStatus.WAITING
        else:
            request.status = RequestStatus.WAITING_FOR_GRAMMAR
            self.to_compile.append(request)
        self.waiting.append(request)

    def take_grammars(self) -> list[Request]:
        """The requests whose grammar the workers must compile (new ones, or all again after the workers
        were lost) since the last call."""
        taken, self.to_compile = [r for r in self.to_compile if not r.finished], []
        return taken

    def has_grammar_drops(self) -> bool:
        return bool(self.grammar_ends or self.grammar_releases)

    def take_grammar_drops(self) -> tuple[list[int], list[str]]:
        """The state rows whose grammar matchers the workers may drop (their requests left them) and the
        requests whose compiled grammar they may drop (they ended), since the last call. The engine sends
        them before the next step, which may reuse those rows."""
        drops = self.grammar_ends, self.grammar_releases
        self.grammar_ends, self.grammar_releases = [], []
        return drops

    def grammar_compiled(self, request: Request) -> None:
        """The workers compiled its grammar: it may run."""
        if request.status is RequestStatus.WAITING_FOR_GRAMMAR:
            request.status = RequestStatus.WAITING

    def find(self, rid: str) -> Request | None:
        for req in self.running:
            if req.rid == rid:
                return req
        for req in self.waiting:
            if req.rid == rid:
                return req
        return None

    def finish(self, request: Request, reason: str) -> None:
        """Remove a request wherever it is and free its pages at once.

        Safe even while a step that writes those pages is in flight: the worker runs steps in
        order, so a later step that reuses the pages writes them after that one is done.
        """
        if request.params.grammar is not None and not request.finished:
            self.grammar_releases.append(request.rid)
        if request.status is RequestStatus.RUNNING:
            self._leave_running(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status, request.finish_reason = RequestStatus.FINISHED, reason
        self.block_manager.release(request.blocks)
        self.block_manager.release(request.cross_blocks)
        _drop_placeholders(request)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def forget_cache(self) -> list[Request]:
        """The workers' KV cache is gone (a worker restarted): forget every page and the prefix
        cache, and put every request back in the queue, oldest first, to recompute from its tokens;
        the new workers compile the grammars again before their requests run.

        Returns the requests that were running (their ``faults`` counted), for the caller's budget.
        """
        hit = list(self.running)
        for req in hit:
            req.faults += 1
            self._leave_running(req)
            req.status = RequestStatus.PREEMPTED
        self.waiting.extendleft(reversed(hit))
        self.grammar_ends, self.grammar_releases = [], []  # the new workers hold no matcher, no compile
        for req in self.waiting:
            req.blocks, req.cross_blocks = [], []  # the whole pool is dropped below
            self._reset(req)
            req.epoch += 1  # results of steps in flight are stale
            if req.params.grammar is not None:
                req.status = RequestStatus.WAITING_FOR_GRAMMAR
        self.to_compile = [req for req in self.waiting if req.params.grammar is not None]
        self.block_manager.clear()
        return hit

    # ------------------------------------------------------------------ the step

    def schedule(self) -> ScheduledBatch | None:
        """Pick the next step: running requests first (oldest first), then waiting ones in order.

        Every decode (one new token) runs; prompt chunks share ``max_step_tokens`` (TGI's
        ``max_batch_prefill_tokens``), so a long prompt is spread over steps instead of stalling;
        beside decodes they share less (``StepCosts.mixed_chunk``), so the streams keep their pace,
        unless ``WAITING_SERVED_RATIO`` waiting requests (ready to run) per decoding one wait.
        Requests that score their prompt share ``MAX_SCORED_ROWS`` scored tokens.
        """
        decoding = sum(1 for r in self.running if r.num_tokens - r.num_computed == 1)
        budget = Budget(self.max_step_tokens, MAX_SCORED_ROWS)
        ready = sum(1 for r in self.waiting if r.status is not RequestStatus.WAITING_FOR_GRAMMAR)
        if ready < WAITING_SERVED_RATIO * decoding:
            budget.tokens = self.costs.mixed_chunk(self.max_step_tokens)
        batch = ScheduledBatch()
        preemptions = self.num_preemptions
        for req in list(self.running):
            if req.status is RequestStatus.PREEMPTED or self._awaits_last_token(req):
                # preempted to make room for an older one this step, or done once its result lands
                continue
            gap = req.num_tokens - req.num_computed
            n = 1 if gap == 1 else budget.chunk(req)  # decodes run; chunks share the budget
            if n <= 0 or not self._reserve(req, n):
                continue
            batch.add(req, n)
            if gap > 1:
                budget.take(req, n)
        if self.num_preemptions == preemptions:  # no room made this step: don't take it back
            self._admit(batch, budget)
        if not batch.requests:
            return None
        return batch

    def _admit(self, batch: ScheduledBatch, budget: Budget) -> None:
        """Waiting requests in order while there is room, passing over those waiting for their grammar."""
        for req in list(self.waiting):
            if budget.tokens <= 0 or len(self.running) >= self.max_running:
                break
            if req.status is RequestStatus.WAITING_FOR_GRAMMAR:
                continue
            if self._prompt_in_flight(req):
                break  # a step or two later its first pages come from the prefix cache
            if len(req.encoder_ids) > budget.tokens and batch.requests:
                break  # an encoder is not chunked: it waits for a step with room for all of it
            budget.tokens -= len(req.encoder_ids)
            hit, queried = self._reuse_prefix(req)
            self._free_behind_window(req)
            n = budget.chunk(req, at_least_one=True)
            grown = n > 0 and self.block_manager.grow(req.blocks, req.num_computed + n)
            if not grown or not self.block_manager.grow(req.cross_blocks, len(req.encoder_ids)):
                self._reset(req)
                break
            self.prefix_hit_tokens += hit
            self.prefix_query_tokens += queried
            if req.scheduled_time is None:
                req.scheduled_time = time.time()
                self.queue_waits.append(req.scheduled_time - req.arrival_time)
                log.debug("rid=%s scheduled: %d tokens in its first step, %d cached", req.rid, n, hit)
            self.waiting.remove(req)
            self._enter_running(req)
            batch.add(req, n)
            batch.admitted += 1
            budget.take(req, n)

    def _prompt_in_flight(self, req: Request) -> bool:
        """A running request is still computing the first page of ``req``'s prompt (copies of one
        prompt: ``n``, ``best_of``), up to the pages a prompt can take from the cache (its last token
        is always computed). Admitting ``req`` now would compute those pages twice; once they are
        registered, ``req`` takes them from the prefix cache."""
        size = self.block_manager.block_size
        if not self.block_manager.enable_prefix_caching or req.encoder_ids or req.params.prompt_logprobs:
            return False
        head = req.token_ids[:size]
        return req.num_tokens > size and any(
            r.hashed_blocks < (r.prompt_len - 1) // size and r.token_ids[:size] == head for r in self.running
        )

    def _enter_running(self, req: Request) -> None:
        """A state row for ``req``; the workers hold nothing of it there yet."""
        req.status, req.row = RequestStatus.RUNNING, RowState(self.free_rows.pop())
        self.running.append(req)

    def _leave_running(self, req: Request) -> None:
        """Its row is free for the next request: steps run in order, so one already in flight still
        reads this request's state, and a later step writes the next one's before using it (and drops
        the row's grammar matcher first)."""
        self.running.remove(req)
        self.free_rows.append(req.row.index)
        if req.row.grammar_sent:
            self.grammar_ends.append(req.row.index)
        req.row = None

    def _awaits_last_token(self, req: Request) -> bool:
        return req.num_output >= req.max_new_tokens or req.num_tokens >= self.max_total_tokens

    def _reuse_prefix(self, req: Request) -> tuple[int, int]:
        """Start a request on the cached blocks of its longest cached prefix; returns the hit tokens
        and the tokens looked up. A request that scores its prompt computes all of it (as TGI)."""
        if req.encoder_ids or req.params.prompt_logprobs:
            return 0, 0
        blocks, parent = self.block_manager.match_prefix(req.token_ids, req.num_tokens - 1)
        req.blocks = blocks
        req.num_computed = len(blocks) * self.block_manager.block_size
        req.hashed_blocks, req.parent_hash = len(blocks), parent
        return req.num_computed, req.num_tokens if self.block_manager.enable_prefix_caching else 0

    def _reset(self, req: Request) -> None:
        """Back to nothing computed, no pages (recompute later, prefix cache permitting)."""
        self.block_manager.release(req.blocks)
        self.block_manager.release(req.cross_blocks)
        _drop_placeholders(req)
        req.num_computed = req.hashed_blocks = req.parent_hash = req.freed_blocks = 0

    def _free_behind_window(self, req: Request) -> None:
        """Give back the leading pages that no later step of ``req`` reads (the window's rule:
        ``BlockManager.behind_window``); with the prefix cache only registered ones, so that each joins
        the cache before it is freed (under the overlap a step's pages register after the next is built).

        At once, though a step in flight may still read them: the worker runs steps in order, so a later
        step that hands them to another request writes them after it (as ``finish``)."""
        count = self.block_manager.behind_window(req.num_computed)
        if self.block_manager.enable_prefix_caching:
            count = min(count, req.hashed_blocks)
        req.freed_blocks = self.block_manager.free_leading(req.blocks, req.freed_blocks, count)

    def _reserve(self, req: Request, n: int) -> bool:
        """Give ``req`` pages for ``n`` more tokens, preempting the newest requests if needed."""
        while not self.block_manager.grow(req.blocks, req.num_computed + n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        """Recompute later: free the pages, keep the tokens, go back to the head of the queue."""
        self._leave_running(req)
        self._reset(req)
        req.status = RequestStatus.PREEMPTED
        req.epoch += 1
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def update(
        self,
        batch: ScheduledBatch,
        sampled: list[int],
        logprobs: list[float],
        top: tuple[list[list[int]], list[list[float]]] | None = None,
        prompt_logprobs: list[float] = (),
        grammar_done: list[bool] = (),
    ) -> list[Produced]:
        """Apply a finished step: put the sampled tokens in place, register full blocks, finish requests.

        ``sampled``/``logprobs`` (and ``top``'s ids and logprobs, and ``grammar_done``: the row's grammar
        allows nothing more) hold one entry per request that sampled (in batch order);
        ``prompt_logprobs`` one per scored prompt token (``ScheduledBatch.scored_prompt``). Returns what
        every request that received a token got; finished ones have ``finish_reason`` set and are
        already removed, their pages freed.
        """
        self._record_prompt_logprobs(batch, prompt_logprobs)
        produced = []
        rows = len(sampled)
        top_ids, top_logprobs = top or ([[]] * rows, [[]] * rows)
        done = grammar_done or [False] * rows
        results = iter(zip(sampled, logprobs, top_ids, top_logprobs, done, strict=True))
        for i, req in enumerate(batch.requests):
            slot = batch.sample_slots[i]
            result = next(results) if slot >= 0 else None
            if req.finished or req.epoch != batch.epochs[i]:
                continue  # finished, aborted or preempted since: its token is dropped
            if not req.encoder_ids:
                req.hashed_blocks, req.parent_hash = self.block_manager.register(
                    req.blocks,
                    req.token_ids,
                    batch.starts[i] + batch.num_new[i],
                    req.hashed_blocks,
                    req.parent_hash,
                )
                self._free_behind_window(req)
            if result is None:
                continue
            token, logprob, ids, values, grammar_done_here = result
            req.token_ids[slot] = token
            first = slot - req.prompt_len == req.resumed
            produced.append(Produced(req, token, logprob, *_top(req, ids, values), first))
            reason = self._finish_reason(req, slot, grammar_done_here)
            if reason:
                self.finish(req, reason)
        return produced

    def _record_prompt_logprobs(self, batch: ScheduledBatch, values: list[float]) -> None:
        """Each scored position p gives prompt token p + 1's logprob (the first has none)."""
        values = iter(values)
        for i, position, count in batch.scored_prompt():
            req = batch.requests[i]
            scores = [next(values) for _ in range(count)]
            if not req.finished and req.epoch == batch.epochs[i]:
                req.prompt_logprobs[position + 1 : position + 1 + count] = scores

    def _finish_reason(self, req: Request, slot: int, grammar_done: bool) -> str | None:
        token = req.token_ids[slot]
        if (token in self.eos_token_ids and not req.params.ignore_eos) or token in req.params.stop_token_ids:
            return "eos_token"
        if grammar_done:  # its grammar allows nothing more
            return "eos_token"
        if slot + 1 - req.prompt_len >= req.max_new_tokens or slot + 1 >= self.max_total_tokens:
            return "length"
        return None


@dataclasses.dataclass
class Budget:
    """What is left of a step's budgets while it is filled: prompt tokens, and scored prompt tokens."""

    tokens: int
    scored: int

    def chunk(self, req: Request, at_least_one: bool = False) -> int:
        """The most tokens ``req`` may run now (``at_least_one``: even with the token budget spent)."""
        n = max(self.tokens, 1) if at_least_one else self.tokens
        if req.params.prompt_logprobs and req.num_computed < req.prompt_len - 1:
            n = min(n, self.scored)  # its scored tokens come first
        return min(n, req.num_tokens - req.num_computed)

    def take(self, req: Request, n: int) -> None:
        """``req`` runs ``n`` tokens (its counters already advanced by them)."""
        self.tokens -= n
        if req.params.prompt_logprobs:
            start = req.num_computed - n
            self.scored -= max(0, min(n, req.prompt_len - 1 - start))


def _top(req: Request, ids: list[int], logprobs: list[float]) -> tuple[list[int], list[float]]:
    """The request's own share of a row's top tokens: as many as it asked, none it could not draw."""
    n = req.params.top_n_tokens
    kept = [(t, lp) for t, lp in zip(ids[:n], logprobs[:n], strict=True) if math.isfinite(lp)]
    return [t for t, _ in kept], [lp for _, lp in kept]


def _drop_placeholders(req: Request) -> None:
    """Forget tokens sampled by steps whose results will not be used."""
    while len(req.token_ids) > req.prompt_len and req.token_ids[-1] < 0:
        req.token_ids.pop()
