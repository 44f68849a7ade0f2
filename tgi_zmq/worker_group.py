"""The model workers, seen from the scheduler: the engine's executor over ZeroMQ, and the group's
supervision.

Steps go out as a ``StepRequest`` header on a ROUTER socket to every rank, their tensors in a ring
of shared-memory buffers (always host memory: each rank copies a step to its own device, so no
rank reads another one's GPU); the grammars a step starts and ends ride in rank 0's header only (it
alone samples). Rank 0 answers with a ``StepResult`` whose tensors are in its own buffer (CUDA IPC on
GPU) or a ``WorkerFailure``. Grammars are announced to rank 0 alone (``GrammarRequest``), which
answers each with a ``GrammarResult`` between two steps.

Supervision: which ranks are loaded (their boot ids), and killing them when the group must
restart (supervisord starts them again). A process group cannot take a new member, so every rank
restarts together. Messages from a worker that was restarted or killed are void.
"""

from __future__ import annotations

import logging
import re

import zmq

from tgi_zmq import messages as m
from tgi_zmq.config import RING_SLOTS, ServerConfig
from tgi_zmq.engine import StepDone, StepFailure, WorkersLost
from tgi_zmq.messages import Grammar
from tgi_zmq.pids import ProcessHandle
from tgi_zmq.runtime import BOOT_ID
from tgi_zmq.step import Step, StepOutput, step_buffer_size
from tgi_zmq.transport import TensorReader, TensorRing, remove_stale

log = logging.getLogger("tgi_zmq.worker_group")


def public_reason(message: str) -> str:
    """A worker's error for clients: its first line without source paths (gloo, torch)."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return re.sub(r"\S*/\S+:\d+\S*|\s*\(\S*/\S+\)", "", first)[:200]


class WorkerGroup:
    def __init__(self, config: ServerConfig, sock: zmq.Socket):
        self.config = config
        self.sock = sock  # ROUTER: a worker's identity is ``worker-<rank>``
        remove_stale(f"{config.shm_prefix}-step")  # a killed predecessor's buffers (workers drop theirs)
        size = step_buffer_size(
            config.max_batch_prefill_tokens,
            config.max_concurrent_requests,
            config.max_total_tokens,
            config.block_size,
        )
        # a name no worker has mapped before: a worker that outlived a scheduler cannot read stale steps
        self.ring = TensorRing(f"{config.shm_prefix}-step-{BOOT_ID}", RING_SLOTS, size, "cpu")
        self.results = TensorReader(config.device)
        self.boots: dict[int, str] = {}  # rank -> boot id, of the ranks loaded and ready
        self.processes: dict[int, ProcessHandle] = {}  # rank -> its process, learnt from its messages
        self.lost_boots: set[str] = set()  # workers restarted or killed: their late messages are void
        self.pending: set[int] = set()  # steps sent and not answered
        self.answers: dict[int, m.StepResult | m.WorkerFailure] = {}  # arrived, not yet taken
        self.grammar_answers: list[tuple[str, str]] = []  # (rid, refusal) from rank 0, not yet taken

    @property
    def ready(self) -> bool:
        return len(self.boots) == self.config.num_shard

    # ------------------------------------------------------------------ the executor

    def submit(self, step_id: int, step: Step) -> None:
        """Send a step to every rank: its header, and to a rank on another node its tensors too."""
        buffer, refs, handle = self.ring.write(step.to_tensors())
        header = m.encode(m.StepRequest(step_id, BOOT_ID, buffer, refs, handle, step.grammars))
        others = header
        if self.config.num_shard > 1:  # no grammars: rank 0 alone samples
            others = m.encode(m.StepRequest(step_id, BOOT_ID, buffer, refs, handle))
        local = self.config.local_ranks
        tensors = self.ring.copy(buffer, refs) if len(local) < self.config.num_shard else b""
        self.pending.add(step_id)
        try:
            for rank in range(self.config.num_shard):
                frames = [f"worker-{rank}".encode(), others if rank else header]
                self.sock.send_multipart(frames if rank in local else [*frames, tensors])
        except zmq.ZMQError as exc:  # a rank is gone (ROUTER_MANDATORY): its replacement will boot
            raise WorkersLost(str(exc)) from exc

    def compile_grammar(self, rid: str, grammar: Grammar) -> None:
        """Announce a request's grammar to rank 0 (the rank that samples compiles it)."""
        try:
            self.sock.send_multipart([b"worker-0", m.encode(m.GrammarRequest(rid, grammar))])
        except zmq.ZMQError as exc:
            raise WorkersLost(str(exc)) from exc

    def compiled_grammars(self) -> list[tuple[str, str]]:
        taken, self.grammar_answers = self.grammar_answers, []
        return taken

    def drop_grammars(self, rows: list[int], rids: list[str]) -> None:
        """Tell rank 0 which matchers and compiles it may drop (in order with the steps)."""
        try:
            self.sock.send_multipart([b"worker-0", m.encode(m.GrammarDropRequest(rows, rids))])
        except zmq.ZMQError as exc:
            raise WorkersLost(str(exc)) from exc

    def broadcast(self, msg: m.ProfileRequest) -> None:
        """Send a control message to every rank, in order with its steps (a rank not up misses it)."""
        frame = m.encode(msg)
        for rank in range(self.config.num_shard):
            try:
                self.sock.send_multipart([f"worker-{rank}".encode(), frame])
            except zmq.ZMQError as exc:
                log.warning("worker %d did not get %s: %s", rank, type(msg).__name__, exc)

    def result(self, step_id: int) -> StepDone | StepFailure | None:
        answer = self.answers.pop(step_id, None)
        if answer is None:
            return None
        self.pending.discard(step_id)
        if isinstance(answer, m.WorkerFailure):
            return StepFailure(public_reason(answer.message))
        tensors = self.results.read(answer.buffer, answer.tensors, answer.cuda_handle)
        return StepDone(StepOutput.from_tensors(tensors), answer.forward_seconds, answer.decode_seconds)

    def restart(self, spare: int | None = None) -> None:
        """Kill every rank still up but ``spare`` and forget the steps in flight: this node's by their
        pids, another node's through its agent (``processes/node.py``)."""
        members = [rank for rank in self.boots if rank != spare and rank in self.config.local_ranks]
        self.lost_boots.update(self.boots.values())
        self.boots.clear()  # not ready until every rank says so again
        for rank in members:
            if rank in self.processes and not self.processes[rank].kill():
                log.warning("worker %d (pid %d) is gone: nothing killed", rank, self.processes[rank].pid)
        restart = m.encode(m.RestartRanksRequest(-1 if spare is None else spare))
        for node in range(1, self.config.nnodes):
            try:
                self.sock.send_multipart([f"node-{node}".encode(), restart])
            except zmq.ZMQError as exc:  # its agent is not connected: its ranks are down or will notice
                log.warning("node %d's agent did not get the restart: %s", node, exc)
        self.pending.clear()
        self.answers.clear()
        self.grammar_answers.clear()
        self.results.close()  # the old workers' result buffers
        self.results = TensorReader(self.config.device)

    # ------------------------------------------------------------------ what the workers say

    def booting(self, msg: m.WorkerBooting) -> bool:
        """A rank (re)starts; True if ranks were up (its process or its group is gone: restart)."""
        self._learn(msg.rank, msg.pid)
        return bool(self.boots)

    def loaded(self, msg: m.WorkerReady) -> bool:
        """A rank is loaded (said at start, then every second while idle); True if it is news. A rank
        with fewer KV blocks than configured is refused (once, then ignored): the group stays not
        ready, /health says so, and requests fail with a 503 after ``--recovery-timeout``."""
        if msg.boot_id in self.lost_boots or self.boots.get(msg.rank) == msg.boot_id:
            return False
        if msg.num_blocks < self.config.num_blocks:
            log.error("worker %d has %d KV blocks, fewer than configured: refused", msg.rank, msg.num_blocks)
            self.lost_boots.add(msg.boot_id)
            return False
        self.boots[msg.rank] = msg.boot_id
        self._learn(msg.rank, msg.pid)
        log.info("worker %d ready (boot %s)", msg.rank, msg.boot_id)
        return True

    def _learn(self, rank: int, pid: int) -> None:
        if rank not in self.processes or self.processes[rank].pid != pid:
            self.processes[rank] = ProcessHandle.learn(pid)

    def answered(self, msg: m.StepResult | m.WorkerFailure) -> str | None:
        """Keep a step's answer for ``result``; returns why the group must restart, if it must."""
        if msg.scheduler_boot != BOOT_ID:
            return None  # a step of the scheduler this one replaced
        if isinstance(msg, m.WorkerFailure):
            log.error("a worker failed step %d: %s", msg.step_id, msg.message)
            if msg.boot_id in self.lost_boots:
                return None  # its group is already being restarted
            if self.config.num_shard > 1:  # the ranks' group cannot go on: every rank restarts
                return f"a worker failed: {public_reason(msg.message)}"
        if msg.step_id in self.pending:  # else a step of a group restarted since
            self.answers[msg.step_id] = msg
        return None

    def grammar_answered(self, msg: m.GrammarResult) -> None:
        """Keep rank 0's answer for the engine, unless it comes from a rank 0 since replaced."""
        if msg.boot_id == self.boots.get(0):
            self.grammar_answers.append((msg.rid, msg.refusal))

    def node_joins(self, msg: m.NodeJoinRequest) -> None:
        """Another node asks for the configuration its ranks must share with ours."""
        log.info("node %d joins", msg.node_rank)
        try:
            self.sock.send_multipart(
                [msg.reply_to.encode(), m.encode(m.NodeJoinResult(self.config.to_json()))]
            )
        except zmq.ZMQError as exc:
            log.warning("node %d left before its answer: %s", msg.node_rank, exc)

    def close(self) -> None:
        self.ring.close()
        self.results.close()
