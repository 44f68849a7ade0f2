"""Scheduler process: continuous batching over the KV pages, one forward step at a time.

tokenizer --ScheduleRequest/AbortRequest/ProfileRequest--> [scheduler] <--StopRequest-- detokenizer
[scheduler] --StepRequest (header; tensors in shared memory), ProfileRequest--> workers
workers --StepResult--> [scheduler]
[scheduler] --BatchTokenOutput--> detokenizer;  --ErrorOutput--> frontend

Main loop: take in whatever arrived (requests, aborts, the workers' answers) -> one turn of the
engine core (``tgi_zmq.engine``: launch the next step, apply the oldest one's result) -> send the
tokens and failures on. The loop only waits for input when a turn made no progress. A request with a
grammar waits off the policy while a thread compiles it (``tgi_zmq.grammar.Compile``), whose end wakes
the loop through a pipe.

A restarted scheduler knows nothing: the workers re-announce themselves while idle and the frontend
replays its requests (``frontend/pipeline.py``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import Future

import zmq

from tgi_zmq import cpus
from tgi_zmq import messages as m
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.config import POLL_MS, STATS_PERIOD_S, ServerConfig
from tgi_zmq.engine import EngineCore, Outcome
from tgi_zmq.errors import ValidationError, generation_error
from tgi_zmq.grammar import Compile, GrammarEngine, GrammarError
from tgi_zmq.policy import Produced, Request, ScheduledBatch, SchedulePolicy
from tgi_zmq.runtime import (
    dispatch,
    exit_on_sigterm,
    failure_reporter,
    pull,
    push,
    setup_logging,
    start_heartbeat,
)
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
        self.to_detok = push(ctx, config.endpoint("detokenizer"))
        self.to_frontend = push(ctx, config.endpoint("frontend"))
        self.fail = failure_reporter(self.to_frontend, "scheduler", log)
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self.poller.register(router, zmq.POLLIN)
        self.wake_r, self.wake_w = os.pipe()  # a grammar compile's thread writes a byte: the loop wakes
        os.set_blocking(self.wake_w, False)
        self.poller.register(self.wake_r, zmq.POLLIN)
        self.workers = WorkerGroup(config, router)
        self.policy = SchedulePolicy(
            BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching),
            max_step_tokens=config.max_batch_prefill_tokens,
            max_running=config.max_concurrent_requests,
            eos_token_ids=config.eos_token_ids,
            max_total_tokens=config.max_total_tokens,
        )
        self.engine = EngineCore(
            self.policy, self.workers, config.block_size, config.overlap_schedule, config.watchdog_timeout
        )
        self.stats = StatsReporter(self.policy, config)
        self.grammars: Future[GrammarEngine] = Future()  # loaded in the background (load_grammars)
        threading.Thread(target=self.load_grammars, daemon=True, name="grammar-load").start()
        self.compiling: dict[str, tuple[Request, Compile]] = {}  # requests waiting for their grammar
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
            self.admit_compiled()
            progressed = False
            if self.workers.ready:
                outcome = self.engine.step()
                self.publish(outcome)
                progressed = outcome.progressed

    def receive(self, timeout_ms: int) -> None:
        """Handle everything that is waiting (a request whose handler raises fails alone)."""
        for sock, _ in self.poller.poll(timeout_ms):
            if sock == self.wake_r:
                os.read(self.wake_r, 4096)  # a grammar's compile is over: admit_compiled takes it
                continue
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
        """A request; a replay arrives with the tokens it already streamed after its prompt."""
        args = (msg.params, msg.max_new_tokens, msg.arrival_time)
        resumed = len(msg.output_ids)
        start = self.config.decoder_start_token_id
        if start is None:
            prompt = msg.input_ids
            req = Request(msg.rid, prompt + msg.output_ids, *args, prompt_len=len(prompt), resumed=resumed)
        else:  # the prompt feeds the encoder
            tokens = [start, *msg.output_ids]
            req = Request(msg.rid, tokens, *args, prompt_len=1, encoder_ids=msg.input_ids, resumed=resumed)
        req.received_time, req.tokenize_seconds = time.time(), msg.tokenize_seconds
        log.debug("rid=%s queued: %d prompt tokens", msg.rid, len(msg.input_ids))
        if msg.params.grammar is None:
            self.policy.add(req)
        else:  # compiled off this loop (in a thread, or cached): admit_compiled adds it once ready
            compiled = self.grammar_engine().compile(msg.params.grammar)
            self.compiling[req.rid] = (req, compiled)
            compiled.on_ready(self.wake)

    def admit_compiled(self) -> None:
        """Requests whose grammar is compiled enter the policy; one refused or timed out gets its 422
        (the tokenizer process accepted it: only a compile slower here than there can be refused)."""
        for rid, (req, compiled) in list(self.compiling.items()):
            if not compiled.ready:
                continue
            del self.compiling[rid]
            try:
                # past a replay's tokens; it says when the grammar is done (the worker makes the masks)
                req.grammar = compiled.matcher(req.token_ids[req.prompt_len :])
            except GrammarError as exc:
                self.to_frontend.send(m.encode(ValidationError(f"grammar: {exc}").output(rid)))
                continue
            self.policy.add(req)

    def wake(self) -> None:
        """Wake the loop (called from a compile's thread); a full pipe has woken it already."""
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"!")

    def load_grammars(self) -> None:
        """llguidance over the model's tokenizer: seconds of work, done in a thread at start."""
        try:
            if self.config.disable_grammar_support:  # the tokenizer process refuses every grammar
                raise ValueError("grammar support is disabled")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.config.model_id)
            self.grammars.set_result(GrammarEngine(tokenizer, self.config.grammar_compile_timeout))
        except Exception as exc:  # raised again by the first grammar_engine()
            self.grammars.set_exception(exc)

    def grammar_engine(self) -> GrammarEngine:
        """The engine; a grammar that comes before it is loaded waits for it."""
        return self.grammars.result()

    def abort(self, msg: m.AbortRequest) -> None:
        self.finish(msg.rid, "aborted")
        self.to_detok.send(m.encode(msg))  # after the tokens already sent: it frees the request there

    def stop(self, msg: m.StopRequest) -> None:
        self.finish(msg.rid, "stop_sequence")

    def finish(self, rid: str, reason: str) -> None:
        if self.compiling.pop(rid, None) is not None:
            log.info("rid=%s %s while its grammar compiled", rid, reason)
            return
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
        orphans += [req for req, _ in self.compiling.values()]
        self.compiling.clear()
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
        """Send the turn's tokens to the detokenizer and its failures to the frontend."""
        self.emit(outcome.produced)
        for req, reason in outcome.failed:
            self.to_frontend.send(m.encode(generation_error(req.rid, reason)))
            self.to_detok.send(m.encode(m.AbortRequest(req.rid)))
        if outcome.done is not None:
            self.stats.step(outcome.done.batch, outcome.forward_seconds)

    def emit(self, produced: list[Produced]) -> None:
        out = m.BatchTokenOutput([], [], [], [], [])
        tops = any(p.top_ids for p in produced)
        for req, token, logprob, top_ids, top_logprobs in produced:
            if not req.announced:
                req.announced = True
                now = time.time()
                out.new_requests.append(self.detok_info(req, now))
                log.info("rid=%s first token after %.3fs", req.rid, now - req.arrival_time)
            out.rids.append(req.rid)
            out.token_ids.append(token)
            out.logprobs.append(logprob)
            out.finish_reasons.append(req.finish_reason)
            if tops:
                out.top_ids.append(top_ids)
                out.top_logprobs.append(top_logprobs)
            if req.finish_reason:
                log.info("rid=%s finished: %s, %d tokens", req.rid, req.finish_reason, req.num_output)
        if out.rids:
            self.to_detok.send(m.encode(out))

    @staticmethod
    def detok_info(req: Request, now: float) -> m.DetokRequestInfo:
        """What the detokenizer needs of a new request: the prompt (its tail gives the first token's
        context; none for seq2seq, whose output starts afresh), stops, the tokens already streamed, and
        its stage times up to its first token (``now``), which the detokenizer completes."""
        prompt = [] if req.encoder_ids else req.token_ids[: req.prompt_len]
        scheduled = req.scheduled_time or now
        stages = m.StageTimes(req.tokenize_seconds, scheduled - req.received_time, now - scheduled, 0.0, 0.0)
        return m.DetokRequestInfo(
            req.rid,
            prompt,
            len(req.encoder_ids) or req.prompt_len,
            req.params.stop,
            req.token_ids[req.prompt_len : req.prompt_len + req.resumed],
            req.prompt_logprobs,
            stages,
            now,
        )

    def close(self) -> None:
        self.workers.close()


class StatsReporter:
    """Collects per-step figures and sends a ``SchedulerStats`` to the frontend periodically."""

    def __init__(self, policy: SchedulePolicy, config: ServerConfig):
        self.policy = policy
        self.config = config
        self.forward: list[m.ForwardTiming] = []
        self.sent_hits = 0
        self.sent_preemptions = 0
        self.last = 0.0

    def step(self, batch: ScheduledBatch, seconds: float) -> None:
        self.forward.append(m.ForwardTiming("decode" if batch.is_decode else "prefill", seconds))

    def maybe_send(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        if now - self.last < STATS_PERIOD_S:
            return
        self.last = now
        p = self.policy
        stats = m.SchedulerStats(
            queue_size=len(p.waiting),
            batch_size=len(p.running),
            kv_blocks_used=p.block_manager.num_used,
            kv_blocks_cached=p.block_manager.num_cached_free,
            kv_blocks_total=p.block_manager.num_blocks,
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
    config = ServerConfig.load()
    cpus.apply("scheduler", config.num_shard)
    process = SchedulerProcess(config)
    try:
        process.run()
    finally:
        process.close()


if __name__ == "__main__":
    main()
