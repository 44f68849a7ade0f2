"""Scheduler process: continuous batching over the KV pages, one forward step at a time.

tokenizer --TokenizedRequest/AbortRequest--> [scheduler] <--StopRequest-- detokenizer
[scheduler] --ForwardStep (header; tensors in shared memory)--> workers --StepResult--> [scheduler]
[scheduler] --BatchTokenOutput--> detokenizer;  --ErrorOutput--> frontend

Main loop: take in new requests and aborts -> pick the next step -> write its tensors and send it
-> apply the oldest step's sampled tokens once they come back -> send them on. With the overlap
schedule (default) step N+1 is picked and sent while the workers run step N.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections import deque

import torch
import zmq

from tgi_zmq import messages as m
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.config import ServerConfig
from tgi_zmq.detokenizer import PROMPT_TAIL
from tgi_zmq.runtime import exit_on_sigterm, pull, push, setup_logging, start_heartbeat
from tgi_zmq.scheduler import Request, ScheduledBatch, Scheduler
from tgi_zmq.step import build_step
from tgi_zmq.transport import TensorReader, TensorRing

log = setup_logging("scheduler")


def step_buffer_size(config: ServerConfig) -> int:
    """Bytes one step's tensors can need at most (tokens, block tables, penalty histories)."""
    rows = config.max_concurrent_requests
    max_blocks = -(-config.max_total_tokens // config.block_size)
    return (
        24 * (config.max_batch_prefill_tokens + rows)
        + 4 * rows * max_blocks
        + 8 * rows * config.max_total_tokens
        + 128 * rows
        + (1 << 20)
    )


@dataclasses.dataclass
class InFlight:
    """A step sent to the workers whose result has not been applied yet."""

    step_id: int
    batch: ScheduledBatch
    started: float
    ahead: int  # steps already in flight when this one was built
    sent: float = 0.0


class SchedulerProcess:
    def __init__(self, config: ServerConfig):
        self.config = config
        ctx = zmq.Context.instance()
        self.inbox = pull(ctx, config.endpoint("scheduler"))
        self.workers = ctx.socket(zmq.ROUTER)
        self.workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.workers.bind(config.endpoint("worker"))
        self.to_detok = push(ctx, config.endpoint("detokenizer"))
        self.to_frontend = push(ctx, config.endpoint("frontend"))
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self.poller.register(self.workers, zmq.POLLIN)
        self.ring = TensorRing(f"{config.shm_prefix}-step", 4, step_buffer_size(config), config.device)
        self.results = TensorReader(config.device)
        self.policy = Scheduler(
            BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching),
            max_step_tokens=config.max_batch_prefill_tokens,
            max_running=config.max_concurrent_requests,
            eos_token_ids=config.eos_token_ids,
            max_total_tokens=config.max_total_tokens,
        )
        self.worker_boots: dict[int, str] = {}  # rank -> boot id, of the ranks loaded and ready
        self.worker_pids: dict[int, int] = {}
        self.step_id = 0
        self.inflight: deque[InFlight] = deque()
        self.answers: dict[int, m.StepResult | m.WorkerFailure] = {}  # arrived, not yet applied
        self.stats = StatsReporter(self.policy, config)

    @property
    def ready(self) -> bool:
        return len(self.worker_boots) == self.config.num_shard

    def run(self) -> None:
        """Keep up to ``depth`` steps in flight: step N+1 is built and sent while the workers run N."""
        start_heartbeat(self.config, "scheduler", lambda: self.ready)
        log.info("waiting for %d worker(s)", self.config.num_shard)
        depth = 2 if self.config.overlap_schedule else 1
        while True:
            busy = self.ready and (self.policy.has_work() or self.inflight)
            self.receive(timeout_ms=0 if busy else 100)
            if not self.ready:
                continue
            launched = len(self.inflight) < depth and self.launch_step()
            if self.inflight and (len(self.inflight) == depth or not launched):
                self.complete_step()

    # ------------------------------------------------------------------ messages in

    def receive(self, timeout_ms: int) -> None:
        """Handle everything that is waiting; steps' answers are kept in ``self.answers``."""
        self.stats.maybe_send(self.to_frontend)
        for sock, _ in self.poller.poll(timeout_ms):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = m.decode(frames[-1])
                except m.ProtocolError as exc:
                    log.error("dropped a bad frame: %s", exc)
                    continue
                self.handle(msg)

    def new_request(self, msg: m.TokenizedRequest) -> Request:
        args = (msg.params, msg.max_new_tokens, msg.arrival_time)
        start = self.config.decoder_start_token_id
        if start is None:
            return Request(msg.rid, msg.input_ids, *args)
        return Request(msg.rid, [start], *args, encoder_ids=msg.input_ids)  # the prompt feeds the encoder

    def handle(self, msg) -> None:
        if isinstance(msg, m.TokenizedRequest):
            self.policy.add(self.new_request(msg))
        elif isinstance(msg, m.AbortRequest | m.StopRequest):
            self.finish(msg.rid, "aborted" if isinstance(msg, m.AbortRequest) else "stop_sequence")
            if isinstance(msg, m.AbortRequest):
                self.to_detok.send(m.encode(msg))
        elif isinstance(msg, m.WorkerBooting):
            self.worker_booting(msg)
        elif isinstance(msg, m.WorkerReady):
            self.worker_ready(msg)
        elif isinstance(msg, m.WorkerFailure) and self.config.num_shard > 1:
            if self.worker_boots:  # else: the group is already being restarted
                self.restart_workers(f"a worker failed: {msg.message}")
        elif isinstance(msg, m.StepResult | m.WorkerFailure):
            if any(step.step_id == msg.step_id for step in self.inflight):  # else: a failed step's
                self.answers[msg.step_id] = msg  # may come before ``wait_for`` asks (fast models)
        else:
            log.error("unexpected message %s", type(msg).__name__)

    def finish(self, rid: str, reason: str) -> None:
        req = self.policy.find(rid)
        if req is not None:
            self.policy.finish(req, reason)
            log.info("rid=%s %s after %d tokens", rid, reason, req.num_output)

    def worker_booting(self, msg: m.WorkerBooting) -> None:
        """A worker (re)starts: if any rank was up, its process or its group is gone."""
        self.worker_pids[msg.rank] = msg.pid
        if self.worker_boots:
            self.restart_workers(f"worker {msg.rank} restarted", spare=msg.rank)

    def restart_workers(self, reason: str, spare: int | None = None) -> None:
        """Fail every request; with tensor parallelism also kill the ranks that were up (supervisord
        restarts them): a process group cannot take a new member, so all ranks form a new one."""
        log.error(
            "%s: failing every request%s", reason, ", restarting the workers" * (self.config.num_shard > 1)
        )
        self.fail_all(reason)
        members = [rank for rank in self.worker_boots if rank != spare]
        self.worker_boots.clear()  # not ready until every rank says so again
        for rank in members if self.config.num_shard > 1 else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker_pids[rank], signal.SIGKILL)

    def worker_ready(self, msg: m.WorkerReady) -> None:
        self.worker_boots[msg.rank] = msg.boot_id
        if msg.num_blocks < self.policy.blocks.num_blocks:
            raise RuntimeError(f"worker {msg.rank} has {msg.num_blocks} KV blocks, fewer than configured")
        log.info("worker %d ready (boot %s)", msg.rank, msg.boot_id)

    # ------------------------------------------------------------------ the step

    def launch_step(self) -> bool:
        """Schedule the next step, write its tensors and send it to every worker."""
        started = time.perf_counter()
        batch = self.policy.schedule()
        if batch is None:
            return False
        self.step_id += 1
        buffer, refs, handle = self.ring.write(build_step(batch, self.config.block_size))
        header = m.encode(m.ForwardStep(self.step_id, buffer, refs, handle))
        step = InFlight(self.step_id, batch, started, len(self.inflight))
        self.inflight.append(step)
        try:
            for rank in range(self.config.num_shard):
                self.workers.send_multipart([f"worker-{rank}".encode(), header])
        except zmq.ZMQError as exc:
            self.inflight.remove(step)
            self.fail_batch(batch, f"worker unreachable ({exc})")
            return False
        step.sent = time.perf_counter()
        return True

    def complete_step(self) -> None:
        """Wait for the oldest step's result, apply it and send its tokens to the detokenizer."""
        step = self.inflight[0]
        waiting = time.perf_counter()
        answer = self.wait_for(step.step_id)
        if not self.inflight or self.inflight[0] is not step:
            return  # a worker restarted meanwhile: every request was failed and the queue cleared
        self.inflight.popleft()
        if isinstance(answer, m.WorkerFailure):
            self.fail_batch(step.batch, answer.message)
            return
        received = time.perf_counter()
        out = self.results.read(answer.buffer, answer.tensors, answer.cuda_handle)
        produced = self.policy.update(step.batch, out["next_ids"].tolist(), out["logprobs"].tolist())
        self.emit(produced)
        self.stats.step(step.batch, answer.forward_seconds)
        log.debug(
            "step %d: %d requests, %d tokens; built in %.2f ms with %d step(s) in flight; "
            "waited %.2f ms for the result (forward %.2f ms); applied in %.2f ms",
            step.step_id,
            len(step.batch.requests),
            sum(step.batch.num_new),
            (step.sent - step.started) * 1e3,
            step.ahead,
            (received - waiting) * 1e3,
            answer.forward_seconds * 1e3,
            (time.perf_counter() - received) * 1e3,
        )

    def wait_for(self, step_id: int) -> m.StepResult | m.WorkerFailure:
        """Wait for the step's answer while still taking in requests and aborts."""
        while True:
            boots = dict(self.worker_boots)
            if step_id in self.answers:
                return self.answers.pop(step_id)
            self.receive(timeout_ms=100)
            if boots != self.worker_boots:
                return m.WorkerFailure(step_id, "a worker restarted during the step")

    def emit(self, produced: list[tuple[Request, int, float]]) -> None:
        out = m.BatchTokenOutput([], [], [], [], [])
        for req, token, logprob in produced:
            if not req.announced:
                req.announced = True
                info = m.DetokRequestInfo(
                    req.rid,
                    []
                    if req.encoder_ids
                    else req.token_ids[max(0, req.prompt_len - PROMPT_TAIL) : req.prompt_len],
                    len(req.encoder_ids) or req.prompt_len,
                    req.params.stop,
                    req.params.seed,
                )
                out.new_requests.append(info)
                log.info("rid=%s first token after %.3fs", req.rid, time.time() - req.arrival_time)
            out.rids.append(req.rid)
            out.token_ids.append(token)
            out.logprobs.append(logprob)
            out.finish_reasons.append(req.finish_reason)
            if req.finish_reason:
                log.info("rid=%s finished: %s, %d tokens", req.rid, req.finish_reason, req.num_output)
        if out.rids:
            self.to_detok.send(m.encode(out))

    # ------------------------------------------------------------------ failures

    def fail_batch(self, batch: ScheduledBatch, reason: str) -> None:
        log.error("step %d failed: %s", self.step_id, reason)
        for req in batch.requests:
            self.fail(req, reason)

    def fail_all(self, reason: str) -> None:
        self.inflight.clear()
        self.answers.clear()
        for req in list(self.policy.running) + list(self.policy.waiting):
            self.fail(req, reason)

    def fail(self, req: Request, reason: str) -> None:
        if req.finish_reason is None:
            self.policy.finish(req, "error")
        message = f"Request failed during generation: {reason}"
        self.to_frontend.send(m.encode(m.ErrorOutput(req.rid, message, "generation", 424)))
        self.to_detok.send(m.encode(m.AbortRequest(req.rid)))

    def close(self) -> None:
        self.ring.close()
        self.results.close()


class StatsReporter:
    """Collects per-step figures and sends a ``SchedulerStats`` to the frontend twice a second."""

    PERIOD = 0.5

    def __init__(self, policy: Scheduler, config: ServerConfig):
        self.policy = policy
        self.config = config
        self.forward: list[list] = []
        self.sent_hits = 0
        self.sent_preemptions = 0
        self.last = 0.0

    def step(self, batch: ScheduledBatch, seconds: float) -> None:
        decode = all(n == 1 for n in batch.num_new) and all(batch.samples())
        self.forward.append(["decode" if decode else "prefill", seconds])

    def maybe_send(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        if now - self.last < self.PERIOD:
            return
        self.last = now
        p = self.policy
        stats = m.SchedulerStats(
            queue_size=len(p.waiting),
            batch_size=len(p.running),
            kv_blocks_used=p.blocks.num_used,
            kv_blocks_cached=p.blocks.num_cached_free,
            kv_blocks_total=p.blocks.num_blocks,
            max_batch_total_tokens=self.config.max_batch_total_tokens,
            prefix_cache_hit_tokens=p.prefix_hit_tokens - self.sent_hits,
            preemptions=p.num_preemptions - self.sent_preemptions,
            queue_seconds=p.queue_waits,
            forward_seconds=self.forward,
        )
        self.sent_hits, self.sent_preemptions = p.prefix_hit_tokens, p.num_preemptions
        p.queue_waits, self.forward = [], []
        sock.send(m.encode(stats))


def main() -> None:
    exit_on_sigterm()
    torch.set_num_threads(1)
    process = SchedulerProcess(ServerConfig.load())
    try:
        process.run()
    finally:
        process.close()


if __name__ == "__main__":
    main()
