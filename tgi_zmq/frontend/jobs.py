"""Generations in flight: admission control, submission, output accumulation, abort and logging."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator

from tgi_zmq.errors import RequestError, request_error
from tgi_zmq.messages import ErrorOutput, GenerateRequest, RequestDelta, StageTimes, TokenList

from .metrics import Metrics
from .pipeline import Mailbox, Pipeline

log = logging.getLogger("tgi_zmq.frontend")


class Admission:
    """TGI's concurrency limit: a semaphore tried without waiting (429 when full)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    @contextlib.contextmanager
    def admit(self, n: int = 1) -> Iterator[None]:
        if self.in_flight + n > self.limit:
            raise RequestError("Model is overloaded", error_type="overloaded", status=429)
        self.in_flight += n
        try:
            yield
        finally:
            self.in_flight -= n


@dataclasses.dataclass(eq=False)
class Job:
    """One generation request and everything it produced so far."""

    request: GenerateRequest
    box: Mailbox
    index: int = 0  # choice index within its group
    started: float = dataclasses.field(default_factory=time.monotonic)
    first_output: float | None = None
    ended: float | None = None
    texts: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    token_texts: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    specials: list[bool] = dataclasses.field(default_factory=list)
    top_tokens: list[TokenList] = dataclasses.field(default_factory=list)  # per token, if asked
    prompt: TokenList | None = None  # the scored prompt, if asked
    finish_reason: str | None = None
    error_type: str | None = None  # set when the pipeline reported a failure
    generated_tokens: int = 0
    prompt_tokens: int = 0
    stages: StageTimes | None = None  # where it spent its time, from its last delta

    @property
    def rid(self) -> str:
        return self.request.rid

    @property
    def failed(self) -> bool:
        return self.error_type is not None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.failed

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def mean_logprob(self) -> float:
        """How ``best_of`` ranks copies (TGI's rule): the mean logprob of the generated tokens."""
        return sum(self.logprobs) / max(len(self.logprobs), 1)

    @property
    def seed(self) -> int | None:
        return self.request.params.seed

    def absorb(self, delta: RequestDelta) -> None:
        now = time.monotonic()
        if self.first_output is None:
            self.first_output = now
        self.texts.append(delta.text)
        self.token_ids += delta.token_ids
        self.token_texts += delta.token_texts
        self.logprobs += delta.logprobs
        self.specials += delta.specials
        self.top_tokens += delta.top_tokens
        if self.prompt is None:  # a replayed request scores its prompt again: keep the first
            self.prompt = delta.prompt
        self.generated_tokens = delta.generated_tokens
        self.prompt_tokens = delta.prompt_tokens
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.ended = now
            self.stages = delta.stages

    def duration(self) -> float:
        return (self.ended or time.monotonic()) - self.started


class JobGroup:
    """The jobs of one HTTP request (several for a multi-prompt completion), sharing one wakeup."""

    def __init__(self, jobs: list[Job], wakeup: asyncio.Event) -> None:
        self.jobs = jobs
        self.wakeup = wakeup

    @property
    def done(self) -> bool:
        return all(job.done for job in self.jobs)

    def failure(self) -> str | None:
        """Why the group did not succeed: a job's ``error_type``, or "dropped" if some job never ended."""
        errors = [job.error_type for job in self.jobs if job.error_type is not None]
        if errors:
            return errors[0]
        return None if self.done else "dropped"

    async def next(self, timeout: float | None = None) -> list[tuple[Job, RequestDelta]]:
        """The deltas that arrived since the last call; [] on timeout; RequestError if a job failed."""
        try:
            async with asyncio.timeout(timeout):
                await self.wakeup.wait()
        except TimeoutError:
            return []
        self.wakeup.clear()
        out: list[tuple[Job, RequestDelta]] = []
        for job in self.jobs:
            for item in job.box.take():
                if not job.done:
                    self._receive(job, item, out)
        return out

    def _receive(self, job: Job, item: RequestDelta | ErrorOutput, out: list) -> None:
        if isinstance(item, ErrorOutput):
            job.error_type = item.error_type
            raise request_error(item)
        if job.first_output is None:
            log.debug("rid=%s first output after %.3fs", job.rid, job.duration())
        job.absorb(item)
        out.append((job, item))
        if job.finish_reason is not None:
            log.info(
                "rid=%s finished finish_reason=%s prompt_tokens=%d generated_tokens=%d duration=%.3fs",
                job.rid,
                job.finish_reason,
                job.prompt_tokens,
                job.generated_tokens,
                job.duration(),
            )

    async def collect(self) -> None:
        """Wait until every job finished (non-streaming routes)."""
        while not self.done:
            await self.next()


def _prompt_chars(request: GenerateRequest) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(m.get("content") or "") for m in request.chat or ())


@contextlib.contextmanager
def submit(pipeline: Pipeline, requests: list[GenerateRequest], *, route: str) -> Iterator[JobGroup]:
    """Send ``requests`` down the pipeline; on exit abort whichever did not finish (client gone).

    Metrics: every finished generation is observed; the request's outcome is counted here when the
    block exits normally, otherwise by ``Metrics.request`` around the route handler.
    """
    wakeup = asyncio.Event()
    for req in requests:
        log.info("rid=%s received route=%s prompt_chars=%d", req.rid, route, _prompt_chars(req))
    jobs = [Job(req, pipeline.open(req, wakeup), index=i) for i, req in enumerate(requests)]
    group = JobGroup(jobs, wakeup)
    try:
        yield group
        _count_outcome(pipeline.metrics, group)
    finally:
        for job in jobs:
            _observe(pipeline.metrics, job)
            pipeline.close_box(job.box)
            if not job.done:
                log.info(
                    "rid=%s aborted after %d tokens (%.3fs)", job.rid, len(job.token_ids), job.duration()
                )


def _count_outcome(metrics: Metrics, group: JobGroup) -> None:
    failure = group.failure()
    if failure is None:
        metrics.succeeded()
    else:
        metrics.failed(failure)


def _observe(metrics: Metrics, job: Job) -> None:
    if job.ended is None:  # did not finish
        return
    metrics.generation_finished(
        seconds=job.duration(),
        prompt_tokens=job.prompt_tokens,
        generated_tokens=job.generated_tokens,
        decode_seconds=job.ended - (job.first_output or job.ended),
        max_new_tokens=job.request.max_new_tokens,
    )
    if job.stages is not None:
        metrics.observe_stages(job.stages)
