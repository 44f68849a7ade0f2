"""Model worker process (one per tensor-parallel rank): holds the weights and the KV pages.

scheduler --ForwardStep--> [worker] --StepResult (rank 0; tensors in shared memory)--> scheduler

Main loop: receive a step header -> view its tensors in shared memory -> forward + sample
-> write the sampled ids and logprobs into this worker's buffer -> answer with a header.

With ``--num-shard N`` every rank gets every step header and reads the same shared memory;
the ranks meet in collectives during the forward (``tgi_zmq.parallel``) and only rank 0
answers. A failed step then leaves the group unusable (a peer is dead, hung, or out of step):
the rank reports it and exits, and the scheduler has every rank restarted together.

While idle a worker says ``WorkerReady`` again every second: a scheduler that restarted learns
that it is up. Steps of a scheduler other than the last one seen are from a dead one; a new one
starts from nothing, so the worker drops what it kept of the old one (mapped buffers, samples).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import zmq

from tgi_zmq import messages as m
from tgi_zmq.config import ServerConfig
from tgi_zmq.runtime import BOOT_ID, exit_on_sigterm, setup_logging, start_heartbeat

ANNOUNCE_MS = 1000  # idle time after which a worker says again that it is ready


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=0)
    rank = parser.parse_args().rank
    log = setup_logging(f"worker-{rank}")
    exit_on_sigterm()
    config = ServerConfig.load()
    loaded = False
    start_heartbeat(config, f"worker-{rank}", lambda: loaded)  # before the slow imports: /health is 503 now
    import torch

    from tgi_zmq.model_runner import ModelRunner
    from tgi_zmq.models import weight_bytes
    from tgi_zmq.parallel import init_group
    from tgi_zmq.transport import TensorReader, TensorRing, remove_stale

    torch.set_num_threads(config.torch_threads or max(1, (os.cpu_count() or 1) // config.num_shard))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"worker-{rank}".encode())
    sock.setsockopt(zmq.LINGER, 1000)  # a failure report must get out before the process exits
    sock.connect(config.endpoint("worker"))
    sock.send(m.encode(m.WorkerBooting(rank, BOOT_ID, os.getpid())))

    started = time.perf_counter()
    device = f"cuda:{rank}" if config.device == "cuda" else config.device  # one GPU per rank
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    shard = init_group(rank, config.num_shard, config.master_addr, config.master_port, device)
    log.info(
        "loading %s (%s on %s, rank %d of %d)",
        config.model_id,
        config.dtype,
        device,
        rank,
        shard.world,
    )
    args = (config.model_id, config.dtype, device, config.num_blocks, config.block_size)
    runner = ModelRunner(*args, shard)
    log.info(
        "loaded in %.1fs; weights %.1f MiB on this rank; KV cache %d blocks x %d tokens (%.0f MiB)",
        time.perf_counter() - started,
        weight_bytes(runner.model) / 2**20,
        config.num_blocks,
        config.block_size,
        runner.cache.nbytes() / 2**20,
    )

    ready = m.encode(m.WorkerReady(rank, BOOT_ID, os.getpid(), config.num_blocks))
    sock.send(ready)
    loaded = True

    steps = TensorReader(device)
    remove_stale(f"{config.shm_prefix}-result-{rank}")  # a killed predecessor's buffers
    results = TensorRing(f"{config.shm_prefix}-result-{rank}-{BOOT_ID}", 4, 1 << 20, device)
    scheduler_boot = None
    try:
        while True:
            idle = time.perf_counter()
            while not sock.poll(ANNOUNCE_MS):
                with contextlib.suppress(zmq.Again):  # no scheduler now: the next one will hear it
                    sock.send(ready, zmq.NOBLOCK)
            try:
                msg = m.decode(sock.recv(), m.ForwardStep)
            except m.ProtocolError as exc:
                log.error("dropped a bad frame: %s", exc)
                continue
            idle = time.perf_counter() - idle
            if msg.scheduler_boot != scheduler_boot:
                if scheduler_boot is not None:
                    log.warning(
                        "a new scheduler (boot %s): dropping the old one's buffers", msg.scheduler_boot
                    )
                scheduler_boot = msg.scheduler_boot
                steps.close()
                steps = TensorReader(device)
                runner.forget_samples()
            shard.comm_seconds = 0.0
            answer = run_step(runner, steps, results, msg, log)
            log.debug(
                "step %d: idle %.2f ms before it, forward %.2f ms, all-reduce %.2f ms",
                msg.step_id,
                idle * 1e3,
                getattr(answer, "forward_seconds", 0.0) * 1e3,
                shard.comm_seconds * 1e3,
            )
            if rank == 0 or isinstance(answer, m.WorkerFailure):
                sock.send(m.encode(answer))
            if isinstance(answer, m.WorkerFailure) and shard.world > 1:
                log.error("leaving: the ranks' group cannot go on after a failed step")
                sock.close()  # lingers until the report is sent
                os._exit(1)
    finally:
        results.close()
        steps.close()


def run_step(runner, steps, results, msg: m.ForwardStep, log):
    """Forward one step; a failure becomes a ``WorkerFailure`` answer instead of a crash."""
    started = time.perf_counter()
    try:
        out = runner.execute(steps.read(msg.buffer, msg.tensors, msg.cuda_handle))
    except Exception as exc:  # a bad step must not take the worker down
        log.exception("step %d failed", msg.step_id)
        return m.WorkerFailure(msg.step_id, msg.scheduler_boot, BOOT_ID, f"{type(exc).__name__}: {exc}")
    buffer, refs, handle = results.write(out)
    return m.StepResult(msg.step_id, msg.scheduler_boot, buffer, refs, handle, time.perf_counter() - started)


if __name__ == "__main__":
    main()
