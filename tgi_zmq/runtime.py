"""What every pipeline process does the same way: logging, sockets, heartbeats, and the error policy.

The error policy of every process loop (``serve`` in the tokenizer and the detokenizer,
``SchedulerProcess.receive``, the frontend's reader), applied by ``dispatch``:

- A message that belongs to one request (it has a ``rid``) is handled ``errors.isolated``: an exception
  fails that request alone with a 500 ``internal`` error (``errors.internal_error``) sent to the
  frontend, which answers the client and sends an ``AbortRequest`` down the pipeline so every process
  forgets the request; the process goes on with its next message.
- A message that covers several requests (``BatchTokenOutput`` in the detokenizer, ``BatchTextOutput``
  in the frontend) isolates each request inside it the same way.
- Only a broken invariant stops a process: an exception while handling a message that belongs to no
  request (heartbeats, worker announcements and results, ``FrontendStarted``...: such a message
  changes what the process shares between requests, which is then unknown), or an
  ``errors.BrokenInvariant`` raised anywhere. The process exits and supervisord restarts it; the
  frontend replays what a stateful process held.

The worker applies the same rule to a step, which covers many requests: a failure in one row's
sampling fails that row (``StepOutput.failed``), a failure of the forward pass (shared by every row)
fails the step (``WorkerFailure``), and the engine fails those requests alone (``tgi_zmq.engine``).

Test hook, for the tests only (never set it in production): ``TGI_ZMQ_TEST_FAULTS`` as
``"GenerateRequest:4242,ScheduleRequest:4343"`` makes ``dispatch`` raise for a message of that type
whose sampling seed is that number (``tests/test_e2e_isolation.py``): a poisoned request that the test
chooses, in the process it chooses.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import zmq

from tgi_zmq.config import HEARTBEAT_SECONDS, RUNTIME_DIR_ENV, ServerConfig
from tgi_zmq.errors import Fail, internal_error, isolated
from tgi_zmq.messages import Heartbeat, ProtocolError, decode, encode

BOOT_ID = uuid.uuid4().hex[:12]
TEST_FAULTS_ENV = "TGI_ZMQ_TEST_FAULTS"


def setup_logging(process: str) -> logging.Logger:
    """One line per event: time, level, process name, message (messages carry the request id)."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    replica = os.environ.get("TGI_ZMQ_REPLICA")  # --replicas: which one
    label = process if replica is None else f"{process}/{replica}"
    logging.basicConfig(
        level=level,
        stream=sys.stdout,
        format=f"%(asctime)s %(levelname)s {label} %(message)s",
    )
    return logging.getLogger(process)


def freeze_heap(collect: bool = True) -> None:
    """Put what the start-up made (modules, the model, the tokenizer) out of the garbage collector's
    sight, as vLLM and SGLang do: its full collections then walk only what serving made since. The
    scheduler's walked ~170k objects, a 50-160 ms pause every few thousand steps (measured with
    ``gc.callbacks`` on the default model at c=1), the worker's as long. ``collect``: free the
    start-up's garbage first (else it stays, frozen)."""
    if collect:
        gc.collect()
    gc.freeze()


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks unlink shared memory."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_supervisord() -> None:
    """Be killed when the supervisord that started this process dies: one killed outright (kill -9 of
    a replica) would leave its processes holding the port, and its successor could not start. Its pid
    is in its pidfile in the runtime dir (none: not started by supervisord, nothing to do)."""
    try:
        supervisord = int((Path(os.environ[RUNTIME_DIR_ENV]) / "supervisord.pid").read_text())
    except (KeyError, OSError, ValueError):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisord:  # it died before the line above
        os._exit(1)


def push(ctx: zmq.Context, address: str, hwm: int = 0) -> zmq.Socket:
    """A PUSH socket connected to ``address``; ``hwm`` bounds its queue (0 = unbounded)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.connect(address)
    return sock


def pull(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(address)
    return sock


def start_heartbeat(config: ServerConfig, process: str, ready: Callable[[], bool]) -> threading.Thread:
    """Send a ``Heartbeat`` to the frontend every ``HEARTBEAT_SECONDS`` from a daemon thread.

    It runs beside the main loop (torch releases the GIL), so a long forward pass does not
    look like a dead process; a process that really dies stops beating and /health turns 503.
    """
    ctx = zmq.Context.instance()

    def beat() -> None:
        sock = push(ctx, config.endpoint("frontend"), hwm=4)  # a stalled frontend needs no backlog of beats
        stop = threading.Event()
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(zmq.Again):
                sock.send(encode(Heartbeat(process, BOOT_ID, os.getpid(), bool(ready()))), zmq.NOBLOCK)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    return thread


Handlers = Mapping[type, Callable[[Any], None]]


def serve(inbox: zmq.Socket, handlers: Handlers, log: logging.Logger, fail: Fail) -> None:
    """A pipeline process's loop: decode each frame (only the handled types) and ``dispatch`` it."""
    accepted = tuple(handlers)
    while True:
        try:
            msg = decode(inbox.recv(), accepted)
        except ProtocolError as exc:
            log.error("dropped a bad frame: %s", exc)
            continue
        dispatch(handlers, msg, fail)


def dispatch(handlers: Handlers, msg: Any, fail: Fail) -> None:
    """Hand ``msg`` to its handler under the error policy (see the module's docstring): an exception
    for a request's message is ``fail(rid, exc)``; any other propagates and ends the process."""
    rid = getattr(msg, "rid", None)
    if rid is None:
        handlers[type(msg)](msg)
        return
    with isolated(rid, fail):
        _injected_fault(msg)
        handlers[type(msg)](msg)


def failure_reporter(to_frontend: zmq.Socket, process: str, log: logging.Logger) -> Fail:
    """A pipeline process's ``fail``: log the exception, send the request's 500 to the frontend."""

    def fail(rid: str, exc: Exception) -> None:
        log.error("rid=%s failed (alone): %s: %s", rid, type(exc).__name__, exc, exc_info=exc)
        to_frontend.send(encode(internal_error(rid, process, exc)))

    return fail


def _test_faults(value: str) -> dict[str, int]:
    """``TGI_ZMQ_TEST_FAULTS``'s ``{message type name: seed}`` (tests only)."""
    pairs = (item.split(":") for item in value.split(",") if item.strip())
    return {name.strip(): int(seed) for name, seed in pairs}


_TEST_FAULTS = _test_faults(os.environ.get(TEST_FAULTS_ENV, ""))


def _injected_fault(msg: Any) -> None:
    """The test hook (see the module's docstring): raise for the poisoned request's message."""
    seed = _TEST_FAULTS.get(type(msg).__name__)
    params = getattr(msg, "params", None)
    if seed is not None and params is not None and params.seed == seed:
        raise RuntimeError(f"fault injected by {TEST_FAULTS_ENV} (a test)")
