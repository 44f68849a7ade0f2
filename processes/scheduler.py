"""Scheduler process: continuous batching over the KV pages, one forward step at a time.

tokenizer --TokenizedRequest/AbortRequest--> [scheduler] <--StopRequest-- detokenizer
[scheduler] --ForwardStep (header; tensors in shared memory)--> workers --StepResult--> [scheduler]
[scheduler] --BatchTokenOutput--> detokenizer;  --ErrorOutput--> frontend

Main loop: take in new requests and aborts -> pick the next step -> write its tensors and send it
-> apply the oldest step's sampled tokens once they come back -> send them on. With the overlap
schedule (default) step N+1 is picked and sent while the workers run step N.

Faults: a worker that restarts, fails a sharded step or hangs past the step watchdog loses its KV
cache, so the scheduler forgets every page (and the prefix cache), has the whole worker group
restarted and lets every request recompute from its tokens: sampling is seeded per token, so the
streams go on with the tokens they would have had. A restarted scheduler knows nothing: the workers
re-announce themselves while idle and the frontend replays its requests (``frontend/pipeline.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import time
from collections import deque

import torch
import zmq

from tgi_zmq import messages as m
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.config import ServerConfig
from tgi_zmq.detokenizer import PROMPT_TAIL
from tgi_zmq.runtime import BOOT_ID, exit_on_sigterm, pull, push, setup_logging, start_heartbeat
from tgi_zmq.scheduler import Request, ScheduledBatch, Scheduler
from tgi_zmq.step import build_step
from tgi_zmq.transport import TensorReader, TensorRing, remove_stale

log = setup_logging("scheduler")

MAX_FAULTS = 3  # worker losses a request may run through; then it fails (it may be what kills them)
WATCHDOG_SECONDS_PER_TOKEN = 0.005  # on top of --watchdog-timeout, for a step's size


def public_reason(message: str) -> str:
    """A worker's error for clients: its first line without source paths (gloo, torch)."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return re.sub(r"\S*/\S+:\d+\S*|\s*\(\S*/\S+\)", "", first)[:200]


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
        self.workers.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes its identity back
        self.workers.bind(config.endpoint("worker"))
        self.to_detok = push(ctx, config.endpoint("detokenizer"))
        self.to_frontend = push(ctx, config.endpoint("frontend"))
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self.poller.register(self.workers, zmq.POLLIN)
        remove_stale(f"{config.shm_prefix}-step")  # a killed predecessor's buffers (workers drop theirs)
        ring = f"{config.shm_prefix}-step-{BOOT_ID}"  # never a name a worker has mapped before
        self.ring = TensorRing(ring, 4, step_buffer_size(config), config.device)
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
        self.lost_boots: set[str] = set()  # workers restarted or killed: their late messages are void
        self.step_id = 0
        self.last_done = time.perf_counter()  # when the last step's answer was applied
        self.watchdog_strikes = 0  # watchdog restarts since the last step done: each doubles the bound
        self.inflight: deque[InFlight] = deque()
        self.answers: dict[int, m.StepResult | m.WorkerFailure] = {}  # arrived, not yet applied
        self.stats = StatsReporter(self.policy, config)

    @property
    def ready(self) -> bool:
        return len(self.worker_boots) == self.config.num_shard

    def live(self) -> bool:
        """Ready and making progress (the heartbeat's readiness: /health is 503 otherwise).
        Called from the heartbeat thread, so it reads the queue's head once."""
        try:
            head = self.inflight[0]
        except IndexError:
            return self.ready
        return self.ready and time.perf_counter() <= self.deadline(head)

    def deadline(self, step: InFlight) -> float:
        """When the watchdog gives up on ``step``: its bound grows with its size, from the moment
        the workers could start it (sent, and the step before it done). It doubles after each
        watchdog restart until a step completes, so a merely overloaded machine is not caught in
        a loop of restarts."""
        bound = self.config.watchdog_timeout + WATCHDOG_SECONDS_PER_TOKEN * sum(step.batch.num_new)
        return max(step.sent, self.last_done) + bound * 2**self.watchdog_strikes

    def run(self) -> None:
        """Keep up to ``depth`` steps in flight: step N+1 is built and sent while the workers run N."""
        start_heartbeat(self.config, "scheduler", self.live)
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
        """A request; a replay arrives with the tokens it already streamed after its prompt."""
        args = (msg.params, msg.max_new_tokens, msg.arrival_time)
        resumed = len(msg.output_ids)
        start = self.config.decoder_start_token_id
        if start is None:
            prompt = msg.input_ids
            return Request(msg.rid, prompt + msg.output_ids, *args, prompt_len=len(prompt), resumed=resumed)
        return Request(  # the prompt feeds the encoder
            msg.rid, [start, *msg.output_ids], *args, prompt_len=1, encoder_ids=msg.input_ids, resumed=resumed
        )

    def handle(self, msg) -> None:
        if isinstance(msg, m.TokenizedRequest):
            self.policy.add(self.new_request(msg))
        elif isinstance(msg, m.AbortRequest | m.StopRequest):
            self.finish(msg.rid, "aborted" if isinstance(msg, m.AbortRequest) else "stop_sequence")
            if isinstance(msg, m.AbortRequest):
                self.to_detok.send(m.encode(msg))
        elif isinstance(msg, m.FrontendStarted):
            self.frontend_started()
            self.to_detok.send(m.encode(msg))
        elif isinstance(msg, m.WorkerBooting):
            self.worker_booting(msg)
        elif isinstance(msg, m.WorkerReady):
            self.worker_ready(msg)
        elif isinstance(msg, m.StepResult | m.WorkerFailure):
            self.step_answer(msg)
        else:
            log.error("unexpected message %s", type(msg).__name__)

    def step_answer(self, msg: m.StepResult | m.WorkerFailure) -> None:
        if msg.scheduler_boot != BOOT_ID:
            return  # a step of the scheduler this one replaced
        if isinstance(msg, m.WorkerFailure):
            log.error("a worker failed step %d: %s", msg.step_id, msg.message)
            if msg.boot_id in self.lost_boots:
                return  # its group is already being restarted
            if self.config.num_shard > 1:  # the ranks' group cannot go on: every rank restarts
                self.restart_workers(f"a worker failed: {public_reason(msg.message)}")
                return
        if any(step.step_id == msg.step_id for step in self.inflight):  # else: a failed step's
            self.answers[msg.step_id] = msg  # may come before ``wait_for`` asks (fast models)

    def frontend_started(self) -> None:
        """A new frontend: every request here belongs to clients whose connections died with the old one."""
        orphans = list(self.policy.running) + list(self.policy.waiting)
        for req in orphans:
            self.policy.finish(req, "aborted")
        if orphans:
            log.warning("a new frontend started: dropped %d requests of the old one", len(orphans))

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
        """The workers' KV cache is lost: kill every rank still up but ``spare`` (supervisord restarts
        them; a process group cannot take a new member, so all ranks form a new one), forget every
        page and step in flight, and let the requests recompute once the workers are back."""
        members = [rank for rank in self.worker_boots if rank != spare]
        self.lost_boots.update(self.worker_boots.values())
        self.worker_boots.clear()  # not ready until every rank says so again
        for rank in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker_pids[rank], signal.SIGKILL)
        self.inflight.clear()
        self.answers.clear()
        self.results.close()  # the old workers' result buffers
        self.results = TensorReader(self.config.device)
        hit = self.policy.forget_cache()
        log.error(
            "%s: restarting the workers; %d running and %d waiting requests recompute when they are back",
            reason,
            len(hit),
            len(self.policy.waiting) - len(hit),
        )
        for req in hit:
            if req.faults >= MAX_FAULTS:
                self.fail(req, f"the model workers failed {req.faults} times while running this request")

    def worker_ready(self, msg: m.WorkerReady) -> None:
        """A worker is loaded (said once at start, then again every second while it is idle)."""
        if msg.boot_id in self.lost_boots or self.worker_boots.get(msg.rank) == msg.boot_id:
            return
        if msg.num_blocks < self.policy.blocks.num_blocks:
            raise RuntimeError(f"worker {msg.rank} has {msg.num_blocks} KV blocks, fewer than configured")
        self.worker_boots[msg.rank] = msg.boot_id
        self.worker_pids[msg.rank] = msg.pid
        self.last_done = time.perf_counter()
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
        header = m.encode(m.ForwardStep(self.step_id, BOOT_ID, buffer, refs, handle))
        step = InFlight(self.step_id, batch, started, len(self.inflight))
        self.inflight.append(step)
        try:
            for rank in range(self.config.num_shard):
                self.workers.send_multipart([f"worker-{rank}".encode(), header])
        except zmq.ZMQError as exc:  # a worker is gone (ROUTER_MANDATORY): its replacement will boot
            self.restart_workers(f"a worker is unreachable ({exc})")
            return False
        step.sent = time.perf_counter()
        return True

    def complete_step(self) -> None:
        """Wait for the oldest step's result, apply it and send its tokens to the detokenizer."""
        step = self.inflight[0]
        waiting = time.perf_counter()
        answer = self.wait_for(step)
        if answer is None:
            return  # the workers restart: the steps in flight are void, the requests recompute
        self.inflight.popleft()
        self.last_done = time.perf_counter()
        self.watchdog_strikes = 0
        if isinstance(answer, m.WorkerFailure):
            self.fail_batch(step.batch, public_reason(answer.message))
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

    def wait_for(self, step: InFlight) -> m.StepResult | m.WorkerFailure | None:
        """Wait for the step's answer while still taking in requests and aborts; None if the workers
        restarted meanwhile, or hung past the watchdog's bound (then they are killed)."""
        while True:
            if step.step_id in self.answers:
                return self.answers.pop(step.step_id)
            if time.perf_counter() > self.deadline(step):
                bound = self.deadline(step) - max(step.sent, self.last_done)
                self.watchdog_strikes += 1
                self.restart_workers(f"watchdog: step {step.step_id} took more than {bound:.1f}s")
            self.receive(timeout_ms=100)
            if not self.inflight or self.inflight[0] is not step:
                return None

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
                    req.token_ids[req.prompt_len : req.prompt_len + req.resumed],
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
