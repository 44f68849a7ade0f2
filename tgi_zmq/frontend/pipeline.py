"""The frontend's ZeroMQ side: requests out to the tokenizer, outputs in from the pipeline.

One reader task decodes every frame arriving on the frontend socket and drops each
request's outputs into its ``Mailbox`` (never blocking); the HTTP handler that owns the
mailbox drains it. One sender task writes the outgoing queue, so handlers (and ``finally``
blocks of cancelled handlers) post messages without awaiting.

Replay: every request passes here, so the mailbox also keeps what it takes to run the request
again: the request, its prompt ids (``PromptIdsOutput`` from the tokenizer) and the tokens already
received. When the tokenizer, the scheduler or the detokenizer restarts (a new boot id in its
heartbeat), the requests they held are lost: each unfinished one is aborted and sent again under a
new wire rid with its prompt ids and received tokens, and the stream goes on where it stopped
(sampling is seeded per token: the same tokens come). Outputs of the old rid are dropped. A lost
worker needs no replay: the scheduler recomputes its requests. A request replayed ``MAX_REPLAYS``
times fails with a 424; in-flight requests fail with a 503 when the pipeline stays unhealthy for
``--recovery-timeout`` seconds.

Errors: the reader follows the pipeline's error policy (``tgi_zmq.runtime``): an output that makes its
handler raise fails its request alone (a 500), each request of a ``BatchTextOutput`` apart; any other
exception is a broken invariant and the frontend exits (supervisord starts a new one). A request that
fails, here or in the pipeline (an ``ErrorOutput``), is aborted down the pipeline, so every process
forgets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from tgi_zmq import messages
from tgi_zmq.config import HUNG_AFTER_S, MONITOR_PERIOD_S, ServerConfig
from tgi_zmq.errors import RequestError, generation_error, internal_error, isolated, request_error
from tgi_zmq.messages import (
    AbortRequest,
    BatchTextOutput,
    ChatTokenizeRequest,
    ChatTokenizeResult,
    ErrorOutput,
    FrontendStarted,
    GenerateRequest,
    Heartbeat,
    PromptIdsOutput,
    ProtocolError,
    RequestDelta,
    SchedulerStats,
    TokenizeResult,
    TokenizeTextRequest,
    TokenSpan,
)
from tgi_zmq.runtime import BOOT_ID, dispatch

from .health import Health
from .metrics import Metrics

log = logging.getLogger("tgi_zmq.frontend")

MAX_REPLAYS = 3
STATEFUL = ("tokenizer", "scheduler", "detokenizer")  # their restart loses the requests they held
CLOSE_LINGER_MS = 500  # at close, how long queued frames (aborts) may take to reach the tokenizer

TokenizerQuery = TokenizeTextRequest | ChatTokenizeRequest  # answered by the tokenizer alone


class Mailbox:
    """The outputs of one request not yet read by its handler (sets ``wakeup`` on arrival), and
    what it takes to replay the request after a fault.

    Several mailboxes may share one ``wakeup`` event (a multi-prompt completion). ``rid`` is the
    request's id on the wire, which changes at each replay.
    """

    __slots__ = ("rid", "items", "wakeup", "request", "prompt_ids", "output_ids", "replays", "ended")

    def __init__(self, rid: str, wakeup: asyncio.Event, request: GenerateRequest | TokenizerQuery) -> None:
        self.rid = rid
        self.items: list[Any] = []
        self.wakeup = wakeup
        self.request = request
        self.prompt_ids: list[int] | None = None
        self.output_ids: list[int] = []  # tokens received so far
        self.replays = 0
        self.ended = False  # its last output or its error arrived

    def put(self, item: Any) -> None:
        self.items.append(item)
        self.wakeup.set()

    def replayed(self) -> GenerateRequest | TokenizerQuery:
        """The request to send again, under a new wire rid (outputs of the old one are dropped)."""
        self.replays += 1
        if not isinstance(self.request, GenerateRequest):
            return self.request
        self.rid = f"{self.request.rid}~{self.replays}"
        return dataclasses.replace(
            self.request, rid=self.rid, prompt_ids=self.prompt_ids, output_ids=list(self.output_ids)
        )

    def take(self) -> list[Any]:
        items, self.items = self.items, []
        return items


class Pipeline:
    """Sockets, the rid -> mailbox table and the background reader, sender and health monitor.

    It also holds the frontend's ``Metrics``, fed by the scheduler's stats and by ``jobs.submit``.
    """

    def __init__(self, config: ServerConfig, health: Health) -> None:
        self.config = config
        self.health = health
        self.metrics = Metrics(
            max_input_tokens=config.max_input_tokens,
            max_total_tokens=config.max_total_tokens,
            model_name=config.served_model_name,
            block_size=config.block_size,
            num_blocks=config.num_blocks,
        )
        self._boxes: dict[str, Mailbox] = {}  # by wire rid
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: list[asyncio.Task] = []
        self._unhealthy_since: float | None = None
        self._handlers: dict[type, Callable[[Any], None]] = {
            BatchTextOutput: self._text,
            Heartbeat: self._heartbeat,
            SchedulerStats: self.metrics.observe_scheduler,
            PromptIdsOutput: self._prompt_ids,
            ErrorOutput: self._error,
            TokenizeResult: self._last_output,
            ChatTokenizeResult: self._last_output,
        }

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self.config.endpoint("tokenizer"))
        pull = self._ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 0)
        pull.bind(self.config.endpoint("frontend"))
        if self.config.node0_tcp("frontend"):  # --nnodes: the other nodes' ranks' heartbeats
            pull.bind(self.config.node0_tcp("frontend"))
        peers = pull.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # every process connects to ``pull``
        self._tasks = [
            asyncio.create_task(self._watch_peers(peers), name="frontend-peers"),
            asyncio.create_task(self._send_loop(push), name="frontend-sender"),
            asyncio.create_task(self._read_loop(pull), name="frontend-reader"),
            asyncio.create_task(self._monitor_loop(), name="frontend-health"),
        ]
        self.post(FrontendStarted(BOOT_ID))  # requests of a frontend that died before this one are orphans

    async def close(self) -> None:
        """Flush what handlers posted (aborts of cancelled requests), then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), timeout=1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ctx is not None:
            self._ctx.destroy(linger=CLOSE_LINGER_MS)

    async def _drained(self) -> None:
        while not self._outbox.empty():
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ handler side

    def open(self, request: GenerateRequest | TokenizerQuery, wakeup: asyncio.Event) -> Mailbox:
        """Register a request's mailbox and post the request."""
        box = self._boxes[request.rid] = Mailbox(request.rid, wakeup, request)
        self.post(request)
        return box

    def close_box(self, box: Mailbox) -> None:
        """The handler is done with the request; abort it in the pipeline unless it ended."""
        self._boxes.pop(box.rid, None)
        if not box.ended and isinstance(box.request, GenerateRequest):
            self.post(AbortRequest(box.rid))

    def post(self, msg: Any) -> None:
        """Queue a message for the tokenizer (never blocks)."""
        self._outbox.put_nowait(messages.encode(msg))

    async def tokenize(self, rid: str, prompt: str) -> list[TokenSpan]:
        """The tokens of ``prompt``, with their text."""
        result = await self._ask(TokenizeTextRequest(rid, prompt))
        return result.tokens

    async def chat_tokenize(
        self,
        rid: str,
        chat: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        tool_prompt: str | None,
    ) -> ChatTokenizeResult:
        """A chat's prompt as the template renders it, and its tokens."""
        return await self._ask(ChatTokenizeRequest(rid, chat, tools, tool_prompt))

    async def _ask(self, query: TokenizerQuery) -> Any:
        """The tokenizer's answer to ``query``; its ``ErrorOutput`` raised as a ``RequestError``."""
        wakeup = asyncio.Event()
        box = self.open(query, wakeup)
        try:
            while not box.items:
                await wakeup.wait()
                wakeup.clear()
        finally:
            self.close_box(box)
        item = box.take()[0]  # the tokenizer answers once
        if isinstance(item, ErrorOutput):
            raise request_error(item)
        return item

    def fail(self, box: Mailbox, error: ErrorOutput) -> None:
        """End a request with an error and tell the pipeline to forget it."""
        box.ended = True
        box.put(error)
        if isinstance(box.request, GenerateRequest):  # the tokenizer keeps nothing of a query
            self.post(AbortRequest(box.rid))

    def replay_all(self, reason: str) -> None:
        """Send every unfinished request again (see the module's docstring)."""
        boxes = [box for box in self._boxes.values() if not box.ended]
        if boxes:
            log.warning("%s: replaying %d in-flight requests", reason, len(boxes))
        for box in boxes:
            if box.replays >= MAX_REPLAYS:
                reason = f"the pipeline failed {box.replays + 1} times during this request"
                self.fail(box, generation_error(box.rid, reason))
                continue
            self.post(AbortRequest(box.rid))
            del self._boxes[box.rid]
            self.post(box.replayed())
            self._boxes[box.rid] = box
            self.metrics.request_replays.inc()
            log.info("rid=%s replayed as %s after %d tokens", box.request.rid, box.rid, len(box.output_ids))

    # ------------------------------------------------------------------ background tasks

    async def _send_loop(self, push: zmq.asyncio.Socket) -> None:
        while True:
            frame = await self._outbox.get()
            try:
                await push.send(frame, copy=False)
            except zmq.ZMQError as exc:
                log.error("could not send to the tokenizer: %s", exc)

    async def _read_loop(self, pull: zmq.asyncio.Socket) -> None:
        accepted = tuple(self._handlers)
        while True:
            frame = await pull.recv(copy=True)
            try:
                msg = messages.decode(frame, accepted)
            except ProtocolError as exc:
                log.warning("dropped a malformed frame (%d bytes): %s", len(frame), exc)
                continue
            try:
                self._dispatch(msg)
            except Exception:  # a broken invariant (the module's docstring): start afresh
                log.critical("failed on %s: exiting", type(msg).__name__, exc_info=True)
                os._exit(1)

    def _dispatch(self, msg: Any) -> None:
        dispatch(self._handlers, msg, self._request_failed)

    def _request_failed(self, rid: str, exc: Exception) -> None:
        log.error("rid=%s failed (alone): %s: %s", rid, type(exc).__name__, exc, exc_info=exc)
        box = self._boxes.get(rid)
        if box is not None:
            self.fail(box, internal_error(rid, "frontend", exc))

    # Outputs for a rid with no mailbox are dropped: finished, aborted, replayed since or not ours.

    def _text(self, msg: BatchTextOutput) -> None:
        for delta in msg.deltas:
            with isolated(delta.rid, self._request_failed):
                self._delta(delta)

    def _delta(self, delta: RequestDelta) -> None:
        box = self._boxes.get(delta.rid)
        if box is not None:
            box.output_ids += delta.token_ids
            box.ended = delta.finish_reason is not None
            box.put(delta)

    def _prompt_ids(self, msg: PromptIdsOutput) -> None:
        box = self._boxes.get(msg.rid)
        if box is not None:
            box.prompt_ids = msg.input_ids

    def _last_output(self, msg: TokenizeResult | ChatTokenizeResult) -> None:
        box = self._boxes.get(msg.rid)
        if box is not None:
            box.ended = True
            box.put(msg)

    def _error(self, msg: ErrorOutput) -> None:
        box = self._boxes.get(msg.rid)
        if box is not None:
            self.fail(box, msg)

    def _heartbeat(self, msg: Heartbeat) -> None:
        restarted = self.health.observe(msg)
        if restarted is not None:
            self.metrics.process_restarts.labels(process=restarted).inc()
        if restarted in STATEFUL:
            self.replay_all(f"{restarted} restarted")

    async def _watch_peers(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            await monitor.recv_multipart()
            self.health.peer_lost()

    async def _monitor_loop(self) -> None:
        """Note processes gone silent, kill hung ones (supervisord replaces them, and their
        requests replay); fail every request when the pipeline stays unhealthy too long."""
        while True:
            await asyncio.sleep(MONITOR_PERIOD_S)
            self.health.newly_silent()
            for name, process in self.health.hung():
                log.error(
                    "%s (pid %d) sent no heartbeat for %.0fs: killing it", name, process.pid, HUNG_AFTER_S
                )
                if not process.kill():
                    log.warning("%s (pid %d) is gone: nothing killed", name, process.pid)
            now = time.monotonic()
            if self.health.healthy():
                self._unhealthy_since = None
            elif self._unhealthy_since is None:
                self._unhealthy_since = now
            elif now - self._unhealthy_since > self.config.recovery_timeout:
                self.fail_stuck(now - self._unhealthy_since)

    def fail_stuck(self, unhealthy_for: float) -> None:
        boxes = [box for box in self._boxes.values() if not box.ended]
        if boxes:
            log.error(
                "pipeline unhealthy for %.0fs: failing %d in-flight requests", unhealthy_for, len(boxes)
            )
        message = f"the service did not recover from a fault within {self.config.recovery_timeout:.0f}s"
        error = RequestError(message, error_type="unavailable", status=503)
        for box in boxes:
            self.fail(box, error.output(box.rid))
