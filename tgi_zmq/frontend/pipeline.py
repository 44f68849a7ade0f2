"""The frontend's ZeroMQ side: requests out to the tokenizer, outputs in from the pipeline.

One reader task decodes every frame arriving on the frontend socket and drops each
request's outputs into its ``Mailbox`` (never blocking); the HTTP handler that owns the
mailbox drains it. One sender task writes the outgoing queue, so handlers (and ``finally``
blocks of cancelled handlers) post messages without awaiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import zmq
import zmq.asyncio

from tgi_zmq import messages
from tgi_zmq.config import ServerConfig
from tgi_zmq.messages import (
    AbortRequest,
    BatchTextOutput,
    ErrorOutput,
    Heartbeat,
    ProtocolError,
    SchedulerStats,
    TokenizeRequest,
    TokenizeResult,
)
from tgi_zmq.validation import VALIDATION_PREFIX, RequestError

from .health import Health
from .metrics import Metrics

log = logging.getLogger("tgi_zmq.frontend")

INBOUND = (BatchTextOutput, ErrorOutput, TokenizeResult, Heartbeat, SchedulerStats)
MONITOR_PERIOD_S = 0.5
GENERATION_PREFIX = "Request failed during generation: "


class Mailbox:
    """The outputs of one request not yet read by its handler; sets ``wakeup`` on arrival.

    Several mailboxes may share one ``wakeup`` event (a multi-prompt completion).
    """

    __slots__ = ("rid", "items", "wakeup")

    def __init__(self, rid: str, wakeup: asyncio.Event) -> None:
        self.rid = rid
        self.items: list[Any] = []
        self.wakeup = wakeup

    def put(self, item: Any) -> None:
        self.items.append(item)
        self.wakeup.set()

    def take(self) -> list[Any]:
        items, self.items = self.items, []
        return items


def error_from_output(out: ErrorOutput) -> RequestError:
    """The HTTP error for an ``ErrorOutput`` (adds TGI's message prefix if the sender left it out)."""
    message = out.message
    if out.error_type == "validation" and not message.startswith(VALIDATION_PREFIX):
        message = VALIDATION_PREFIX + message
    elif out.error_type == "generation" and not message.startswith(GENERATION_PREFIX):
        message = GENERATION_PREFIX + message
    return RequestError(message, error_type=out.error_type, status=out.status)


class Pipeline:
    """Sockets, the rid -> mailbox table and the background reader, sender and health monitor.

    It also holds the frontend's ``Metrics``, fed by the scheduler's stats and by ``jobs.submit``.
    """

    def __init__(self, config: ServerConfig, health: Health) -> None:
        self.config = config
        self.health = health
        self.metrics = Metrics(
            max_input_tokens=config.max_input_tokens, max_total_tokens=config.max_total_tokens
        )
        self._boxes: dict[str, Mailbox] = {}
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def in_flight(self) -> int:
        return len(self._boxes)

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self.config.endpoint("tokenizer"))
        pull = self._ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 0)
        pull.bind(self.config.endpoint("frontend"))
        self._tasks = [
            asyncio.create_task(self._send_loop(push), name="frontend-sender"),
            asyncio.create_task(self._read_loop(pull), name="frontend-reader"),
            asyncio.create_task(self._monitor_loop(), name="frontend-health"),
        ]

    async def close(self) -> None:
        """Flush what handlers posted (aborts of cancelled requests), then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), timeout=1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ctx is not None:
            self._ctx.destroy(linger=500)

    async def _drained(self) -> None:
        while not self._outbox.empty():
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ handler side

    def open(self, rid: str, wakeup: asyncio.Event) -> Mailbox:
        """Register a mailbox; do it before posting the request so no output is missed."""
        box = self._boxes[rid] = Mailbox(rid, wakeup)
        return box

    def discard(self, rid: str) -> None:
        self._boxes.pop(rid, None)

    def post(self, msg: Any) -> None:
        """Queue a message for the tokenizer (never blocks)."""
        self._outbox.put_nowait(messages.encode(msg))

    async def tokenize(self, rid: str, prompt: str) -> list[list[Any]]:
        """The ``[id, text, start, stop]`` rows of ``prompt``."""
        wakeup = asyncio.Event()
        box = self.open(rid, wakeup)
        self.post(TokenizeRequest(rid, prompt))
        try:
            while True:
                await wakeup.wait()
                wakeup.clear()
                for item in box.take():
                    if isinstance(item, TokenizeResult):
                        return item.tokens
                    if isinstance(item, ErrorOutput):
                        raise error_from_output(item)
        finally:
            self.discard(rid)

    def fail_all(self, reason: str) -> None:
        """Fail every in-flight request with a 424 and tell the pipeline to forget it."""
        if self._boxes:
            log.error("failing %d in-flight requests: %s", len(self._boxes), reason)
        for rid, box in list(self._boxes.items()):
            box.put(ErrorOutput(rid, GENERATION_PREFIX + reason, "generation", 424))
            self.post(AbortRequest(rid))

    # ------------------------------------------------------------------ background tasks

    async def _send_loop(self, push: zmq.asyncio.Socket) -> None:
        while True:
            frame = await self._outbox.get()
            try:
                await push.send(frame, copy=False)
            except zmq.ZMQError as exc:
                log.error("could not send to the tokenizer: %s", exc)

    async def _read_loop(self, pull: zmq.asyncio.Socket) -> None:
        while True:
            frame = await pull.recv(copy=True)
            try:
                msg = messages.decode(frame, INBOUND)
            except ProtocolError as exc:
                log.warning("dropped a malformed frame (%d bytes): %s", len(frame), exc)
                continue
            try:
                self._dispatch(msg)
            except Exception:  # a bug here must not stop the reader
                log.exception("failed to dispatch %s", type(msg).__name__)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, BatchTextOutput):
            for delta in msg.deltas:
                self._deliver(delta.rid, delta)
        elif isinstance(msg, Heartbeat):
            reason = self.health.observe(msg)
            if reason is not None:
                self.fail_all(reason)
        elif isinstance(msg, SchedulerStats):
            self.metrics.observe_scheduler(msg)
        else:  # ErrorOutput, TokenizeResult
            self._deliver(msg.rid, msg)

    def _deliver(self, rid: str, item: Any) -> None:
        box = self._boxes.get(rid)
        if box is not None:  # unknown rids: finished, aborted or not ours
            box.put(item)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_PERIOD_S)
            for name in self.health.newly_silent():
                self.fail_all(f"{name} stopped responding")
