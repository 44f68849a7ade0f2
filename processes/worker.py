"""Model worker process (one per tensor-parallel rank): holds the weights and the KV pages.

scheduler --StepRequest--> [worker] --StepResult (rank 0; tensors in shared memory)--> scheduler
scheduler --ProfileRequest--> [worker]: start/stop torch.profiler between two steps (``tgi_zmq.profiling``)
scheduler --GrammarRequest--> [worker rank 0] --GrammarResult--> scheduler

Main loop: receive a step header -> view its tensors in shared memory -> forward + sample
-> write the sampled ids and logprobs into this worker's buffer -> answer with a header. Rank 0
also does structured output: it loads the grammar engine on the first grammar (in a thread), compiles each
grammar the scheduler announces in the background and answers between two steps (polling briefly
while compiles are pending: a socket is not thread-safe); the step that first samples for a request
brings its grammar, and rank 0 fills the masks itself (``tgi_zmq.model_runner``, ``tgi_zmq.grammar``).

With ``--num-shard N`` every rank gets every step header and reads the same shared memory;
the ranks meet in collectives during the forward (``tgi_zmq.parallel``) and only rank 0
answers. A failed step then leaves the group unusable (a peer is dead, hung, or out of step):
the rank reports it and exits, and the scheduler has every rank restarted together.

While idle a worker says ``WorkerReady`` again every second: a scheduler that restarted learns
that it is up. Steps of a scheduler other than the last one seen are from a dead one; a new one
starts from nothing, so the worker drops what it kept of the old one (mapped buffers, per-request
state, samples).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

import zmq

from tgi_zmq import cpus
from tgi_zmq import messages as m
from tgi_zmq.config import RING_SLOTS, WORKER_ANNOUNCE_MS, ServerConfig
from tgi_zmq.profiling import StepProfiler
from tgi_zmq.runtime import (
    BOOT_ID,
    die_with_supervisord,
    exit_on_sigterm,
    freeze_heap,
    setup_logging,
    start_heartbeat,
)
from tgi_zmq.steplog import WORKER_STEP

if TYPE_CHECKING:
    from tgi_zmq.grammar import GrammarEngine

GRAMMAR_POLL_MS = 5  # how often an idle rank 0 looks for finished compiles while some are pending


class Worker:
    def __init__(self, rank: int, config: ServerConfig, log: logging.Logger):
        self.rank, self.config, self.log = rank, config, log
        self.loaded = False
        self.scheduler_boot: str | None = None
        self.profiler = StepProfiler(f"worker-{rank}", config.device, log)

    def boot(self) -> None:
        """Join the ranks' group, load this rank's slice of the model, say so."""
        import torch  # the slow imports come after the heartbeat started: /health is 503 meanwhile

        from tgi_zmq import native
        from tgi_zmq.memory import rank_device
        from tgi_zmq.model_runner import ModelRunner
        from tgi_zmq.models import weight_bytes
        from tgi_zmq.parallel import init_group
        from tgi_zmq.sampler import Watermark

        config, rank = self.config, self.rank
        cpus.apply(f"worker-{rank}", config.local_ranks, config.torch_threads)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"worker-{rank}".encode())
        self.sock.setsockopt(zmq.LINGER, 1000)  # a failure report must get out before the process exits
        self.sock.connect(config.endpoint("worker"))
        self.sock.send(m.encode(m.WorkerBooting(rank, BOOT_ID, os.getpid())))

        started = time.perf_counter()
        # only the rank that samples follows grammars
        grammars = self.load_grammars if rank == 0 and not config.disable_grammar_support else None
        self.device = rank_device(config.device, rank - config.local_ranks.start)  # this node's GPUs
        if self.device.startswith("cuda"):
            torch.cuda.set_device(self.device)
        self.shard = init_group(rank, config.num_shard, config.master_addr, config.master_port, self.device)
        native.log_kernels(self.log, self.device, config.kernels)  # what this rank loaded, said early
        native.INVARIANT = config.batch_invariant
        self.log.info(
            "loading %s (%s%s on %s, rank %d of %d)",
            config.model_id,
            config.dtype,
            f", quantize {config.quantize}" if config.quantize else "",
            self.device,
            rank,
            self.shard.world,
        )
        self.runner = ModelRunner(
            config.model_id,
            config.dtype,
            self.device,
            config.num_blocks,
            config.block_size,
            self.shard,
            config.max_concurrent_requests,
            config.max_total_tokens,
            Watermark(config.watermark_gamma, config.watermark_delta),
            grammars=grammars,
            quantize=config.quantize,
            kv_cache_dtype=config.kv_cache_dtype,
        )
        self.log.info(
            "loaded in %.1fs; weights %.1f MiB on this rank; KV cache %d blocks x %d tokens (%.0f MiB)",
            time.perf_counter() - started,
            weight_bytes(self.runner.model) / 2**20,
            config.num_blocks,
            config.block_size,
            self.runner.cache.nbytes() / 2**20,
        )
        if config.batch_invariant and not self.runner.invariant:
            self.log.error("--deterministic: this rank's steps are not batch-invariant (see the warnings)")
        if config.quantize:
            from tgi_zmq.quant import kernels

            self.log.info("quantized matmuls (%s): %s", config.quantize, kernels.backend())
        self.ready = m.encode(m.WorkerReady(rank, BOOT_ID, os.getpid(), config.num_blocks))
        self.sock.send(self.ready)
        self.loaded = True
        self.open_buffers()

    def load_grammars(self) -> Future[GrammarEngine]:
        """Start loading the grammar engine (on the first grammar: ``grammar.RowMatchers``)."""
        from tgi_zmq.grammar import load_engine

        loading = load_engine(self.config.model_id, self.config.grammar_compile_timeout)
        loading.add_done_callback(lambda _: freeze_heap(collect=False))  # no pause if serving
        self.profiler.after = loading
        return loading

    def open_buffers(self) -> None:
        """The reader of the steps and this rank's ring of results, sized for the largest result the
        limits allow (``step.result_buffer_size``)."""
        from tgi_zmq.step import result_buffer_size
        from tgi_zmq.transport import TensorReader, TensorRing, remove_stale

        config = self.config
        self.new_reader = lambda: TensorReader("cpu")  # steps always come in host shared memory
        self.steps = self.new_reader()
        remove_stale(f"{config.shm_prefix}-result-{self.rank}")  # a killed predecessor's buffers
        size = result_buffer_size(
            config.max_concurrent_requests, config.max_top_n_tokens, config.max_batch_prefill_tokens
        )
        name = f"{config.shm_prefix}-result-{self.rank}-{BOOT_ID}"
        self.results = TensorRing(name, RING_SLOTS, size, self.device)

    def run(self) -> None:
        try:
            while True:
                waiting = time.perf_counter()
                msg, carried = self.next_step()
                idle = time.perf_counter() - waiting
                if msg is None:
                    continue
                self.take_scheduler(msg.scheduler_boot)
                self.shard.comm_seconds = 0.0
                with self.profiler.step(msg.step_id):
                    answer = self.run_step(msg, carried)
                if self.log.isEnabledFor(logging.DEBUG):
                    line = WORKER_STEP.format(
                        step=msg.step_id,
                        idle_ms=idle * 1e3,
                        worker_forward_ms=getattr(answer, "forward_seconds", 0.0) * 1e3,
                        comm_ms=self.shard.comm_seconds * 1e3,
                    )
                    self.log.debug("%s", line)
                if self.rank == 0 or isinstance(answer, m.WorkerFailure):
                    self.sock.send(m.encode(answer))
                if isinstance(answer, m.WorkerFailure) and self.shard.world > 1:
                    self.log.error("leaving: the ranks' group cannot go on after a failed step")
                    self.sock.close()  # lingers until the report is sent
                    os._exit(1)
        finally:
            self.results.close()
            self.steps.close()

    def next_step(self) -> tuple[m.StepRequest | None, bytes | None]:
        """Wait for a step header, saying ``WorkerReady`` every second meanwhile and answering the
        grammars compiled since the last call; a ``ProfileRequest``, ``GrammarRequest`` or
        ``GrammarDropRequest`` is acted on here, between two steps (no step is returned). A step comes
        with its tensors to a rank on another node than the scheduler's (``--nnodes``)."""
        announced = time.monotonic()
        self.answer_grammars()
        while not self.sock.poll(GRAMMAR_POLL_MS if self.runner.grammars.pending else WORKER_ANNOUNCE_MS):
            self.answer_grammars()
            if time.monotonic() - announced >= WORKER_ANNOUNCE_MS / 1e3:
                announced = time.monotonic()
                with contextlib.suppress(zmq.Again):  # no scheduler now: the next one will hear it
                    self.sock.send(self.ready, zmq.NOBLOCK)
        frames = self.sock.recv_multipart()
        try:
            msg = m.decode(
                frames[0], (m.StepRequest, m.ProfileRequest, m.GrammarRequest, m.GrammarDropRequest)
            )
        except m.ProtocolError as exc:
            self.log.error("dropped a bad frame: %s", exc)
            return None, None
        if isinstance(msg, m.ProfileRequest):
            self.profiler.control(msg)
            return None, None
        if isinstance(msg, m.GrammarRequest):
            self.runner.grammars.announce(msg.rid, msg.grammar)  # compiled in the background
            return None, None
        if isinstance(msg, m.GrammarDropRequest):
            self.runner.grammars.drop(msg.rows, msg.rids)
            return None, None
        return msg, frames[1] if len(frames) > 1 else None

    def answer_grammars(self) -> None:
        """Tell the scheduler which announced grammars are compiled or refused."""
        for rid, refusal in self.runner.grammars.compiled():
            if refusal:
                self.log.info("rid=%s grammar refused: %s", rid, refusal)
            self.sock.send(m.encode(m.GrammarResult(rid, BOOT_ID, refusal)))

    def read_step(self, msg: m.StepRequest, carried: bytes | None) -> dict:
        """The step's tensors: in the scheduler's shared memory, or ``carried`` in the message."""
        from tgi_zmq.transport import FrameBuffer

        if carried is not None:
            return FrameBuffer(carried).read(msg.tensors)
        return self.steps.read(msg.buffer, msg.tensors, msg.cuda_handle)

    def take_scheduler(self, boot: str) -> None:
        """A step of a new scheduler: drop what was kept of the old one."""
        if boot == self.scheduler_boot:
            return
        if self.scheduler_boot is not None:
            self.log.warning("a new scheduler (boot %s): dropping the old one's buffers and requests", boot)
        self.scheduler_boot = boot
        self.steps.close()
        self.steps = self.new_reader()
        self.runner.forget_requests()

    def run_step(self, msg: m.StepRequest, carried: bytes | None = None) -> m.StepResult | m.WorkerFailure:
        """Forward one step and write its result; a failure becomes a ``WorkerFailure`` answer instead
        of a crash (a row that cannot sample fails alone: ``StepOutput.failed``)."""
        from tgi_zmq.step import Step

        started = time.perf_counter()
        try:
            step = Step.from_tensors(self.read_step(msg, carried), msg.grammars)
            out = self.runner.execute(step)
            buffer, refs, handle = self.results.write(out.to_tensors())
        except Exception as exc:  # a bad step must not take the worker down
            self.log.exception("step %d failed", msg.step_id)
            return m.WorkerFailure(msg.step_id, msg.scheduler_boot, BOOT_ID, f"{type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - started
        return m.StepResult(
            msg.step_id, msg.scheduler_boot, buffer, refs, handle, seconds, self.runner.sample_seconds
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=0)
    rank = parser.parse_args().rank
    log = setup_logging(f"worker-{rank}")
    exit_on_sigterm()
    die_with_supervisord()
    worker = Worker(rank, ServerConfig.load(), log)
    start_heartbeat(worker.config, f"worker-{rank}", lambda: worker.loaded)
    worker.boot()
    freeze_heap()
    worker.run()


if __name__ == "__main__":
    main()
