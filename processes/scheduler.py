"""Scheduler process: continuous batching over the KV pages, one forward step at a time.

tokenizer --ScheduleRequest/AbortRequest/ProfileRequest--> [scheduler] <--StopRequest-- detokenizer
[scheduler] --StepRequest (header; tensors in shared memory), ProfileRequest--> workers
[scheduler] --GrammarRequest--> worker rank 0 --GrammarResult--> [scheduler]
workers --StepResult--> [scheduler]
[scheduler] --BatchTokenOutput--> detokenizer;  --ErrorOutput--> frontend

Main loop: take in whatever arrived (requests, aborts, the workers' answers) -> one turn of the
engine core (``tgi_zmq.engine``: announce grammars, launch the next step, apply the oldest one's
result) -> send the tokens and failures on. The loop only waits for input when a turn made no
progress. A request with a grammar waits in the queue until rank 0 says it compiled it
(``policy.RequestStatus.WAITING_FOR_GRAMMAR``); one it refuses gets its 422.

A restarted scheduler knows nothing: the workers re-announce themselves while idle and the frontend
replays its requests (``frontend/pipeline.py``).
"""

from __future__ import annotations

import time

import zmq

from tgi_zmq import cpus
from tgi_zmq import messages as m
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.config import POLL_MS, STATS_PERIOD_S, ServerConfig
from tgi_zmq.engine import EngineCore, Outcome
from tgi_zmq.errors import ValidationError, generation_error
from tgi_zmq.kv_events import Publisher
from tgi_zmq.policy import Request, SchedulePolicy
from tgi_zmq.runtime import (
    die_with_supervisord,
    dispatch,
    exit_on_sigterm,
    failure_reporter,
    freeze_heap,
    pull,
    push,
    setup_logging,
    start_heartbeat,
)
from tgi_zmq.textstream import token_output
from tgi_zmq.worker_group import WorkerGroup

log = setup_logging("scheduler")


class SchedulerProcess:
    def __init__(self, config: ServerConfig):
        self.config = config
        ctx = zmq.Context.instance()
        self.inbox = pull(ctx, config.endpoint("scheduler"))
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes its identity back
        router.bind(config.endpoint("worker"))
        if config.node0_tcp("worker"):  # --nnodes: the other nodes' ranks and agents
            router.bind(config.node0_tcp("worker"))
        self.to_detok = push(ctx, config.endpoint("detokenizer"))
        self.to_frontend = push(ctx, config.endpoint("frontend"))
        self.fail = failure_reporter(self.to_frontend, "scheduler", log)
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self.poller.register(router, zmq.POLLIN)
        self.workers = WorkerGroup(config, router)
        self.kv_events = kv_events_publisher(config)
        self.policy = SchedulePolicy(
            BlockManager(
                config.num_blocks,
                config.block_size,
                config.enable_prefix_caching,
                self.kv_events is not None,
                config.kv_window,
            ),
            max_step_tokens=config.max_batch_prefill_tokens,
            max_running=config.max_concurrent_requests,
            eos_token_ids=config.eos_token_ids,
            max_total_tokens=config.max_total_tokens,
        )
        self.engine = EngineCore(
            self.policy, self.workers, config.block_size, config.overlap_schedule, config.watchdog_timeout
        )
        self.stats = StatsReporter(self.policy, config)
        self.handlers = {
            m.ScheduleRequest: self.new_request,
            m.AbortRequest: self.abort,
            m.StopRequest: self.stop,
            m.FrontendStarted: self.frontend_started,
            m.ProfileRequest: self.profile,
            m.WorkerBooting: self.worker_booting,
            m.WorkerReady: self.worker_ready,
            m.StepResult: self.step_answer,
            m.WorkerFailure: self.step_answer,
            m.GrammarResult: self.workers.grammar_answered,
            m.NodeJoinRequest: self.workers.node_joins,
        }

    def live(self) -> bool:
        """Ready and making progress (the heartbeat's readiness: /health is 503 otherwise)."""
        return self.workers.ready and self.engine.making_progress()

    def run(self) -> None:
        start_heartbeat(self.config, "scheduler", self.live)
        log.info("waiting for %d worker(s)", self.config.num_shard)
        progressed = False
        while True:
            self.stats.maybe_send(self.to_frontend)
            self.receive(timeout_ms=0 if progressed else POLL_MS)
            progressed = False
            if self.workers.ready:
                outcome = self.engine.step()
                self.publish(outcome)
                progressed = outcome.progressed
            if self.kv_events is not None:
                self.kv_events.publish(self.policy.block_manager.take_events())

    def receive(self, timeout_ms: int) -> None:
        """Handle everything that is waiting (a request whose handler raises fails alone)."""
        for sock, _ in self.poller.poll(timeout_ms):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = m.decode(frames[-1], tuple(self.handlers))
                except m.ProtocolError as exc:
                    log.error("dropped a bad frame: %s", exc)
                    continue
                dispatch(self.handlers, msg, self.fail)  # the error policy: tgi_zmq.runtime

    # ------------------------------------------------------------------ handlers

    def new_request(self, msg: m.ScheduleRequest) -> None:
        """A request (a replay arrives with the tokens it already streamed after its prompt)."""
        log.debug("rid=%s queued: %d prompt tokens", msg.rid, len(msg.input_ids))
        self.policy.add(Request.from_schedule(msg, self.config.decoder_start_token_id))

    def abort(self, msg: m.AbortRequest) -> None:
        self.finish(msg.rid, "aborted")
        self.to_detok.send(m.encode(msg))  # after the tokens already sent: it frees the request there

    def stop(self, msg: m.StopRequest) -> None:
        self.finish(msg.rid, "stop_sequence")

    def finish(self, rid: str, reason: str) -> None:
        req = self.policy.find(rid)
        if req is not None:
            self.policy.finish(req, reason)
            log.info("rid=%s %s after %d tokens", rid, reason, req.num_output)

    def profile(self, msg: m.ProfileRequest) -> None:
        """Start or stop torch.profiler on every worker: each takes it between two steps."""
        log.info("profiling %s: every worker, traces in %s", msg.action, msg.directory)
        self.workers.broadcast(msg)

    def frontend_started(self, msg: m.FrontendStarted) -> None:
        """A new frontend: every request here belongs to clients whose connections died with the old one."""
        orphans = list(self.policy.running) + list(self.policy.waiting)
        for req in orphans:
            self.policy.finish(req, "aborted")
        if orphans:
            log.warning("a new frontend started: dropped %d requests of the old one", len(orphans))
        self.to_detok.send(m.encode(msg))

    def worker_booting(self, msg: m.WorkerBooting) -> None:
        if self.workers.booting(msg):
            self.publish(Outcome(failed=self.engine.lose_workers(f"worker {msg.rank} restarted", msg.rank)))

    def worker_ready(self, msg: m.WorkerReady) -> None:
        if self.workers.loaded(msg):
            self.engine.workers_ready()

    def step_answer(self, msg: m.StepResult | m.WorkerFailure) -> None:
        restart = self.workers.answered(msg)
        if restart:
            self.publish(Outcome(failed=self.engine.lose_workers(restart)))

    # ------------------------------------------------------------------ messages out

    def publish(self, outcome: Outcome) -> None:
        """Send the turn's tokens to the detokenizer, its failures and refused grammars to the frontend."""
        out = token_output(outcome.produced, time.time())
        if out.rids:
            self.to_detok.send(m.encode(out))
        for req, reason in outcome.failed:
            self.to_frontend.send(m.encode(generation_error(req.rid, reason)))
            self.to_detok.send(m.encode(m.AbortRequest(req.rid)))
        for req, refusal in outcome.refused:
            log.info("rid=%s refused: grammar: %s", req.rid, refusal)
            self.to_frontend.send(m.encode(ValidationError(f"grammar: {refusal}").output(req.rid)))
            self.to_detok.send(m.encode(m.AbortRequest(req.rid)))
        if outcome.done is not None:
            self.stats.step(outcome)

    def close(self) -> None:
        self.workers.close()


class StatsReporter:
    """Collects per-step figures and sends a ``SchedulerStats`` to the frontend periodically."""

    def __init__(self, policy: SchedulePolicy, config: ServerConfig):
        self.policy = policy
        self.config = config
        self.forward: list[m.ForwardTiming] = []
        self.sent_hits = 0
        self.sent_queries = 0
        self.sent_preemptions = 0
        self.generated = 0
        self.last = 0.0

    def step(self, outcome: Outcome) -> None:
        """A step's result was applied (``outcome.done``), giving ``outcome.produced``'s tokens."""
        batch = outcome.done.batch
        method = "decode" if batch.is_decode else "prefill"
        timing = m.ForwardTiming(
            method, outcome.forward_seconds, outcome.decode_seconds, outcome.inference_seconds, batch.admitted
        )
        self.forward.append(timing)
        self.generated += len(outcome.produced)

    def maybe_send(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        if now - self.last < STATS_PERIOD_S:
            return
        interval, self.last = (now - self.last if self.last else 0.0), now
        p = self.policy
        stats = m.SchedulerStats(
            queue_size=len(p.waiting),
            batch_size=len(p.running),
            kv_blocks_used=p.block_manager.num_used,
            kv_blocks_cached=p.block_manager.num_cached_free,
            kv_blocks_total=p.block_manager.capacity,
            max_batch_total_tokens=self.config.max_batch_total_tokens,
            prefix_cache_hit_tokens=p.prefix_hit_tokens - self.sent_hits,
            prefix_cache_query_tokens=p.prefix_query_tokens - self.sent_queries,
            preemptions=p.num_preemptions - self.sent_preemptions,
            queue_seconds=p.queue_waits,
            forward_seconds=self.forward,
            generated_tokens=self.generated,
            interval_seconds=interval,
            batch_max_tokens=sum(
                min(r.prompt_len + r.max_new_tokens, self.config.max_total_tokens) for r in p.running
            ),
        )
        self.sent_hits, self.sent_queries = p.prefix_hit_tokens, p.prefix_query_tokens
        self.sent_preemptions = p.num_preemptions
        p.queue_waits, self.forward, self.generated = [], [], 0
        sock.send(m.encode(stats))


def kv_events_publisher(config: ServerConfig) -> Publisher | None:
    if not config.kv_events_endpoint:
        return None
    return Publisher(
        config.kv_events_endpoint, config.kv_events_replay_endpoint, config.kv_events_topic, config.block_size
    )


def main() -> None:
    exit_on_sigterm()
    die_with_supervisord()
    config = ServerConfig.load()
    cpus.apply("scheduler", config.local_ranks)
    process = SchedulerProcess(config)
    freeze_heap()
    try:
        process.run()
    finally:
        process.close()


if __name__ == "__main__":
    main()
