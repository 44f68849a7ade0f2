"""What every pipeline process does the same way: logging, sockets, heartbeats."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from tgi_zmq.config import HEARTBEAT_SECONDS, ServerConfig
from tgi_zmq.messages import Heartbeat, ProtocolError, decode, encode

BOOT_ID = uuid.uuid4().hex[:12]


def setup_logging(process: str) -> logging.Logger:
    """One line per event: time, level, process name, message (messages carry the request id)."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stdout,
        format=f"%(asctime)s %(levelname)s {process} %(message)s",
    )
    return logging.getLogger(process)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks unlink shared memory."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


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


def serve(inbox: zmq.Socket, handlers: Mapping[type, Callable[[Any], None]], log: logging.Logger) -> None:
    """A pipeline process's loop: decode each frame (only the handled types) and hand it to its handler."""
    accepted = tuple(handlers)
    while True:
        try:
            msg = decode(inbox.recv(), accepted)
        except ProtocolError as exc:
            log.error("dropped a bad frame: %s", exc)
            continue
        handlers[type(msg)](msg)
