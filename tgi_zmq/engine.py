"""The engine core: schedule -> build the step -> execute -> apply the result, in one place.

``EngineCore.step()`` is one turn of the engine: announce new grammars to the workers (the worker
that samples compiles them off its loop) and let in the requests whose grammar is compiled, launch
the next step if there is room, then apply the oldest step's result if it has come back. With the
overlap schedule (``depth`` 2) step N+1 is built and submitted while the workers run step N, grammar
requests included: the worker that samples fills their masks from its own matchers
(``tgi_zmq.model_runner``). Nothing here blocks: the caller waits for input between turns (the
scheduler process polls its sockets; ``tgi_zmq.offline.run_to_completion`` just loops).

Where the steps run is an ``Executor``: the worker processes over ZeroMQ in the service
(``tgi_zmq.worker_group``), a model in this process in the tests (``tgi_zmq.offline.LocalExecutor``).

Faults: a lost worker (restarted, failed in a sharded group, hung past the watchdog, unreachable)
loses its KV cache, so ``lose_workers`` has the executor restart them, forgets every page and
step in flight, and lets every request recompute from its tokens (the new workers compile the
grammars again first); sampling is seeded per token, so the streams go on with the tokens they
would have had. A request that runs through ``MAX_FAULTS`` losses fails instead (it may be what
kills them). A failed step fails its requests; a row that could not sample (``StepOutput.failed``)
fails its request alone.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import Protocol

from tgi_zmq.messages import Grammar
from tgi_zmq.policy import Produced, Request, RequestStatus, ScheduledBatch, SchedulePolicy
from tgi_zmq.step import Step, StepOutput, build_step
from tgi_zmq.steplog import SCHEDULER_STEP

log = logging.getLogger("tgi_zmq.engine")

MAX_FAULTS = 3  # worker losses a request may run through
ROW_FAILED = "the model worker could not sample this request's next token"
WATCHDOG_SECONDS_PER_TOKEN = 0.005  # on top of the watchdog timeout, for a step's size
# and per query-key pair its attention scores: a long prompt's later chunks attend to thousands of keys
# a token (an 8,000-token prompt, bfloat16, batch-invariant, 2 Zen 4 cores: 102 s in two steps, ~3 us
# a pair, before the attention kernel's registers; the bound keeps ~3x for a loaded machine)
WATCHDOG_SECONDS_PER_PAIR = 1e-5


@dataclasses.dataclass
class StepFailure:
    """A step the workers could not run (the others go on)."""

    reason: str  # fit for clients: no source paths


@dataclasses.dataclass
class StepDone:
    output: StepOutput
    forward_seconds: float
    decode_seconds: float = 0.0  # of which after the forward (sampling)


class WorkersLost(Exception):
    """The executor cannot reach its workers: they must restart."""


class Executor(Protocol):
    def submit(self, step_id: int, step: Step) -> None:
        """Start ``step`` on the workers (raises ``WorkersLost`` when they cannot be reached)."""

    def result(self, step_id: int) -> StepDone | StepFailure | None:
        """The step's result if it has come back, else None. Never blocks."""

    def restart(self, spare: int | None = None) -> None:
        """The workers' state is lost: drop every step in flight and restart every worker but ``spare``."""

    def compile_grammar(self, rid: str, grammar: Grammar) -> None:
        """Have the worker that samples compile ``grammar`` for request ``rid`` (raises ``WorkersLost``)."""

    def compiled_grammars(self) -> list[tuple[str, str]]:
        """``(rid, refusal)`` of the grammars compiled (refusal "") or refused since the last call."""

    def drop_grammars(self, rows: list[int], rids: list[str]) -> None:
        """Have the worker that samples drop the matchers of ``rows`` and the compiles of the ended
        requests ``rids``, before the next step (raises ``WorkersLost``)."""


def allowance(batch: ScheduledBatch) -> float:
    """The watchdog's seconds for a step's size: its tokens, and the query-key pairs it attends."""
    pairs = sum(n * start + n * (n + 1) // 2 for start, n in zip(batch.starts, batch.num_new, strict=True))
    return WATCHDOG_SECONDS_PER_TOKEN * sum(batch.num_new) + WATCHDOG_SECONDS_PER_PAIR * pairs


@dataclasses.dataclass
class InFlight:
    """A step submitted to the executor whose result has not been applied yet."""

    step_id: int
    batch: ScheduledBatch
    built: float  # when it was scheduled
    steps_ahead: int  # steps already in flight when it was built
    allowance: float  # the watchdog's seconds for its size, on top of the timeout (``allowance``)
    sent: float = 0.0
    waiting_since: float | None = None  # when the engine first wanted its result


@dataclasses.dataclass
class Outcome:
    """What one turn produced, for the caller to send on."""

    produced: list[Produced] = dataclasses.field(default_factory=list)
    failed: list[tuple[Request, str]] = dataclasses.field(default_factory=list)
    refused: list[tuple[Request, str]] = dataclasses.field(default_factory=list)  # their grammar (a 422)
    done: InFlight | None = None  # the step whose result was applied (not one that failed)
    forward_seconds: float = 0.0
    decode_seconds: float = 0.0  # of its forward_seconds, after the forward (sampling)
    inference_seconds: float = 0.0  # the applied step's launch -> result
    launched: bool = False
    room_left: bool = False  # another step may be launched at once

    @property
    def progressed(self) -> bool:
        """Whether another turn at once may do more (else the loop waits for input: a step's result,
        a request). A turn that filled the last free place in flight waits (a third turn a token
        at c=1 found nothing to do)."""
        answered = self.done is not None or bool(self.failed or self.refused)
        return answered or (self.launched and self.room_left)


class EngineCore:
    def __init__(
        self,
        policy: SchedulePolicy,
        executor: Executor,
        block_size: int,
        overlap: bool = True,
        watchdog_timeout: float = 20.0,
    ):
        self.policy = policy
        self.executor = executor
        self.block_size = block_size
        self.eos_token_ids = tuple(sorted(policy.eos_token_ids))  # banned before a row's min_tokens
        self.depth = 2 if overlap else 1
        self.watchdog_timeout = watchdog_timeout
        self.inflight: deque[InFlight] = deque()
        self.step_id = 0
        self.last_done = time.perf_counter()  # when the last step's result was applied
        self.watchdog_strikes = 0  # restarts by the watchdog since the last step done: each doubles the bound

    def has_work(self) -> bool:
        return self.policy.has_work() or bool(self.inflight) or self.policy.has_grammar_drops()

    def step(self) -> Outcome:
        """One turn: grammars, then launch a step if there is room, then apply the oldest step's result
        if it is in."""
        out = Outcome()
        if not self._grammars(out):
            return out  # the workers are lost: nothing to launch or complete until they are back
        out.launched = len(self.inflight) < self.depth and self._launch(out)
        if self.inflight and (len(self.inflight) >= self.depth or not out.launched):
            self._complete(out)
        out.room_left = len(self.inflight) < self.depth
        return out

    def _grammars(self, out: Outcome) -> bool:
        """Announce the grammars the workers are to compile and drop what ended requests left there
        (before the next step, which may reuse their rows); requests whose grammar is compiled may run,
        those whose grammar is refused finish with the reason. False if the workers are lost."""
        try:
            for req in self.policy.take_grammars():
                self.executor.compile_grammar(req.rid, req.params.grammar)
            rows, rids = self.policy.take_grammar_drops()
            if rows or rids:
                self.executor.drop_grammars(rows, rids)
        except WorkersLost as exc:
            out.failed += self.lose_workers(f"the workers are unreachable ({exc})")
            return False
        for rid, refusal in self.executor.compiled_grammars():
            req = self.policy.find(rid)
            if req is None or req.status is not RequestStatus.WAITING_FOR_GRAMMAR:
                continue  # finished meanwhile, or announced again since (the workers were lost)
            if refusal:
                self.policy.finish(req, "error")
                out.refused.append((req, refusal))
            else:
                self.policy.grammar_compiled(req)
        return True

    def _launch(self, out: Outcome) -> bool:
        built = time.perf_counter()
        batch = self.policy.schedule()
        if batch is None:
            return False
        self.step_id += 1
        step = InFlight(self.step_id, batch, built, len(self.inflight), allowance(batch))
        self.inflight.append(step)
        try:
            self.executor.submit(step.step_id, build_step(batch, self.block_size, self.eos_token_ids))
        except WorkersLost as exc:
            out.failed += self.lose_workers(f"the workers are unreachable ({exc})")
            return False
        step.sent = time.perf_counter()
        return True

    def _complete(self, out: Outcome) -> None:
        step = self.inflight[0]
        now = time.perf_counter()
        if step.waiting_since is None:
            step.waiting_since = now
        answer = self.executor.result(step.step_id)
        if answer is None:
            if now > self.deadline(step):
                bound = self.deadline(step) - max(step.sent, self.last_done)
                self.watchdog_strikes += 1
                out.failed += self.lose_workers(f"watchdog: step {step.step_id} took more than {bound:.1f}s")
            return
        self.inflight.popleft()
        self.last_done = received = time.perf_counter()
        self.watchdog_strikes = 0
        if isinstance(answer, StepFailure):
            log.error("step %d failed: %s", step.step_id, answer.reason)
            out.failed += [(req, answer.reason) for req in step.batch.requests if self._fail(req)]
            return
        out.done = step
        self.policy.costs.observe(step.batch, answer.forward_seconds)
        result = answer.output
        out.failed += self._fail_rows(step, result.failed.tolist())
        top = (result.top_ids.tolist(), result.top_logprobs.tolist()) if result.top_ids.shape[-1] else None
        out.produced = self.policy.update(
            step.batch,
            result.next_ids.tolist(),
            result.logprobs.tolist(),
            top,
            result.prompt_logprobs.tolist(),
            result.grammar_done.tolist(),
        )
        out.forward_seconds = answer.forward_seconds
        out.decode_seconds = answer.decode_seconds
        out.inference_seconds = received - step.sent
        if log.isEnabledFor(logging.DEBUG):
            line = SCHEDULER_STEP.format(
                step=step.step_id,
                requests=len(step.batch.requests),
                tokens=sum(step.batch.num_new),
                build_ms=(step.sent - step.built) * 1e3,
                ahead=step.steps_ahead,
                wait_ms=(received - step.waiting_since) * 1e3,
                forward_ms=answer.forward_seconds * 1e3,
                apply_ms=(time.perf_counter() - received) * 1e3,
            )
            log.debug("%s", line)

    def deadline(self, step: InFlight) -> float:
        """When the watchdog gives up on ``step``: its bound grows with its size (``allowance``: its
        tokens and the query-key pairs it attends), from the moment the workers could start it (sent,
        and the step before it done). It doubles after each watchdog restart until a step completes,
        so a merely overloaded machine is not caught in a loop of restarts."""
        bound = self.watchdog_timeout + step.allowance
        return max(step.sent, self.last_done) + bound * 2**self.watchdog_strikes

    def making_progress(self) -> bool:
        """No step is overdue. Safe from another thread: it reads the queue's head once."""
        try:
            head = self.inflight[0]
        except IndexError:
            return True
        return time.perf_counter() <= self.deadline(head)

    def workers_ready(self) -> None:
        """The workers are (back) up: the watchdog counts from now."""
        self.last_done = time.perf_counter()

    def lose_workers(self, reason: str, spare: int | None = None) -> list[tuple[Request, str]]:
        """The workers' KV cache is lost: restart them (all but ``spare``, which is restarting
        already), forget every page and step in flight; the requests recompute once they are back.
        Returns the requests that failed instead (``MAX_FAULTS``), with the reason for clients."""
        self.executor.restart(spare)
        self.inflight.clear()
        hit = self.policy.forget_cache()
        log.error(
            "%s: restarting the workers; %d running and %d waiting requests recompute when they are back",
            reason,
            len(hit),
            len(self.policy.waiting) - len(hit),
        )
        failed = f"the model workers failed {MAX_FAULTS} times while running this request"
        return [(req, failed) for req in hit if req.faults >= MAX_FAULTS and self._fail(req)]

    def _fail_rows(self, step: InFlight, failed: list[bool]) -> list[tuple[Request, str]]:
        """Fail the requests whose row could not sample in the worker (its log says why); the others'
        tokens stand. A request preempted since is left to recompute."""
        batch = step.batch
        rows = [i for i, slot in enumerate(batch.sample_slots) if slot >= 0]
        hit = [(batch.requests[i], batch.epochs[i]) for i, bad in zip(rows, failed, strict=True) if bad]
        if hit:
            log.error("step %d: rows of %s could not sample", step.step_id, [req.rid for req, _ in hit])
        return [(req, ROW_FAILED) for req, epoch in hit if req.epoch == epoch and self._fail(req)]

    def _fail(self, req: Request) -> bool:
        """Finish ``req`` as failed; False if it had finished already."""
        if req.finished:
            return False
        self.policy.finish(req, "error")
        return True
