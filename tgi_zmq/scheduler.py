"""Continuous batching policy: which tokens of which requests run in the next forward pass.

A request has two counters (vLLM v1's idea): ``num_tokens`` (prompt + generated) and
``num_computed`` (tokens whose KV is already in the cache). Every step closes the gap,
so prefill, chunked prefill, decode and recompute after preemption are one rule:
a scheduled request runs ``min(gap, budget)`` tokens, and samples a token when its gap
is closed. Pure Python: the process loop lives in ``processes/scheduler.py``.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from tgi_zmq.block_manager import BlockManager
from tgi_zmq.messages import SamplingParams


@dataclasses.dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    arrival_time: float = 0.0
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    announced: bool = False  # the detokenizer has been told about it

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclasses.dataclass
class ScheduledBatch:
    """One step: the requests and how many new tokens each runs."""

    requests: list[Request]
    num_new: list[int]

    def samples(self) -> list[bool]:
        """Which requests sample a token this step (their gap closes)."""
        return [r.num_computed + n == r.num_tokens for r, n in zip(self.requests, self.num_new, strict=True)]


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_step_tokens: int,
        max_running: int,
        eos_token_ids: tuple[int, ...],
        max_total_tokens: int,
    ):
        self.blocks = blocks
        self.max_step_tokens = max_step_tokens
        self.max_running = max_running
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_total_tokens = max_total_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ arrivals and departures

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def find(self, rid: str) -> Request | None:
        for req in self.running:
            if req.rid == rid:
                return req
        for req in self.waiting:
            if req.rid == rid:
                return req
        return None

    def finish(self, request: Request, reason: str) -> None:
        """Remove a request wherever it is and free its pages at once."""
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.release(request.blocks)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ the step

    def schedule(self) -> ScheduledBatch | None:
        """Pick the next step: running requests first (oldest first), then waiting ones in order."""
        budget = self.max_step_tokens
        batch = ScheduledBatch([], [])
        for req in list(self.running):
            if budget == 0:
                break
            if req not in self.running:  # preempted while making room for an older one
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._reserve(req, n):
                continue
            batch.requests.append(req)
            batch.num_new.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed, budget)
            if not self.blocks.grow(req.blocks, req.num_computed + n):
                break
            self.running.append(self.waiting.popleft())
            batch.requests.append(req)
            batch.num_new.append(n)
            budget -= n
        return batch if batch.requests else None

    def _reserve(self, req: Request, n: int) -> bool:
        """Give ``req`` pages for ``n`` more tokens, preempting the newest requests if needed."""
        while not self.blocks.grow(req.blocks, req.num_computed + n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        """Recompute later: free the pages, keep the tokens, go back to the head of the queue."""
        self.running.remove(req)
        self.blocks.release(req.blocks)
        req.num_computed = 0
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def update(
        self, batch: ScheduledBatch, sampled: list[int], logprobs: list[float]
    ) -> list[tuple[Request, int, float]]:
        """Apply a finished step: advance counters, append sampled tokens, finish requests.

        ``sampled``/``logprobs`` hold one entry per request that sampled (in batch order).
        Returns ``(request, token, logprob)`` for every request that received a token;
        finished ones have ``finish_reason`` set and are already removed, their pages freed.
        """
        produced = []
        results = iter(zip(sampled, logprobs, strict=True))
        for req, n, samples in zip(batch.requests, batch.num_new, batch.samples(), strict=True):
            result = next(results) if samples else None
            if req.finish_reason is not None or req not in self.running:
                continue  # aborted or stopped during the step: its token is dropped
            req.num_computed += n
            if result is None:
                continue
            token, logprob = result
            req.output_ids.append(token)
            produced.append((req, token, logprob))
            reason = self._finish_reason(req)
            if reason:
                self.finish(req, reason)
        return produced

    def _finish_reason(self, req: Request) -> str | None:
        if req.output_ids[-1] in self.eos_token_ids and not req.params.ignore_eos:
            return "eos_token"
        if len(req.output_ids) >= req.max_new_tokens or req.num_tokens >= self.max_total_tokens:
            return "length"
        return None
