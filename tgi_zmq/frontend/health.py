"""Liveness of the pipeline processes, from the heartbeats they send to the frontend."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

from tgi_zmq.config import HEARTBEAT_TIMEOUT_S, HUNG_AFTER_S, ServerConfig
from tgi_zmq.messages import Heartbeat
from tgi_zmq.pids import ProcessHandle

log = logging.getLogger("tgi_zmq.frontend")


def expected_processes(config: ServerConfig) -> tuple[str, ...]:
    """The processes whose heartbeats /health requires."""
    workers = tuple(f"worker-{rank}" for rank in range(config.num_shard))
    return ("tokenizer", "scheduler", "detokenizer", *workers)


def remote_processes(config: ServerConfig) -> frozenset[str]:
    """Those on other nodes (``--nnodes``): their pids name nothing here, so none is killed from here."""
    return frozenset(f"worker-{rank}" for rank in range(config.num_shard) if rank not in config.local_ranks)


@dataclasses.dataclass
class _Peer:
    boot_id: str
    process: ProcessHandle  # learnt at its first heartbeat (pids are reused: see ``tgi_zmq.pids``)
    ready: bool
    last_seen: float
    silent: bool = False
    killed: bool = False


class Health:
    """Who is alive and ready; reports restarts and processes gone silent (once each).

    A heartbeat only goes silent after ``timeout``; a process that dies closes its sockets at once,
    though. ``peer_lost`` (a connection to the frontend closed) starts a roll call: /health stays 503
    until every process has beaten again since, which the living ones do within half a second.
    """

    def __init__(
        self,
        expected: Iterable[str],
        *,
        remote: frozenset[str] = frozenset(),
        timeout: float = HEARTBEAT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.expected = tuple(expected)
        self.remote = remote
        self.timeout = timeout
        self._clock = clock
        self._peers: dict[str, _Peer] = {}
        self._roll_call: float | None = None  # when a connection closed; None when all beat since

    def peer_lost(self) -> None:
        if self._roll_call is None:
            log.warning("a pipeline process closed its connection: waiting for every heartbeat")
        self._roll_call = self._clock()

    def observe(self, beat: Heartbeat) -> str | None:
        """Record a heartbeat; return the process's name if it restarted (a new boot id)."""
        now = self._clock()
        peer = self._peers.get(beat.process)
        same = peer is not None and (peer.boot_id, peer.process.pid) == (beat.boot_id, beat.pid)
        process = peer.process if same else ProcessHandle.learn(beat.pid)
        self._peers[beat.process] = _Peer(beat.boot_id, process, beat.ready, now)
        if peer is None:
            log.info("%s is up (pid %d, boot %s)", beat.process, beat.pid, beat.boot_id)
            return None
        if peer.boot_id != beat.boot_id:
            log.warning("%s restarted (pid %d -> %d)", beat.process, peer.process.pid, beat.pid)
            return beat.process
        if peer.silent:
            log.info("%s is responding again (pid %d)", beat.process, beat.pid)
        if peer.ready != beat.ready:
            log.info("%s is %s", beat.process, "ready" if beat.ready else "not ready")
        return None

    def newly_silent(self) -> list[str]:
        """Expected processes seen before whose heartbeats stopped (each reported once)."""
        now, silent = self._clock(), []
        for name in self.expected:
            peer = self._peers.get(name)
            if peer is not None and not peer.silent and now - peer.last_seen > self.timeout:
                peer.silent = True
                log.warning("%s stopped responding (no heartbeat for %.1f s)", name, now - peer.last_seen)
                silent.append(name)
        return silent

    def hung(self) -> list[tuple[str, ProcessHandle]]:
        """The expected processes silent for ``HUNG_AFTER_S`` (each reported once), to kill."""
        now, hung = self._clock(), []
        for name in self.expected:
            peer = self._peers.get(name)
            if name in self.remote:
                continue  # the scheduler's watchdog restarts a stuck group through the node's agent
            if peer is not None and not peer.killed and now - peer.last_seen > HUNG_AFTER_S:
                peer.killed = True
                hung.append((name, peer.process))
        return hung

    def healthy(self) -> bool:
        """Every expected process sent a ready heartbeat within the timeout (and since the roll call)."""
        now = self._clock()
        if not all(self._alive_and_ready(self._peers.get(name), now) for name in self.expected):
            return False
        if self._roll_call is not None:
            if any(self._peers[name].last_seen < self._roll_call for name in self.expected):
                return False
            self._roll_call = None
        return True

    def _alive_and_ready(self, peer: _Peer | None, now: float) -> bool:
        return peer is not None and peer.ready and now - peer.last_seen <= self.timeout
