"""A worker's failures in process, without sockets: ``Worker.run_step`` writes a result into a buffer
sized from the limits, and one that cannot be written fails the step instead of the worker; a worker
the scheduler cannot use is refused instead of crashing the scheduler."""

from __future__ import annotations

import logging
import uuid

import pytest

from processes.worker import Worker
from tgi_zmq import messages as m
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.config import RING_SLOTS, ServerConfig
from tgi_zmq.model_runner import ModelRunner
from tgi_zmq.policy import Request, SchedulePolicy
from tgi_zmq.step import StepOutput, build_step, result_buffer_size
from tgi_zmq.transport import TensorReader, TensorRing, remove_stale

VOCAB = 2048
ROWS = 48  # x VOCAB top tokens of 12 bytes: 1.2 MB, over the 1 MiB the result buffer used to have
BLOCK = 4


@pytest.fixture(scope="module")
def folder(tiny_models):
    return tiny_models("llama", vocab_size=VOCAB)


@pytest.fixture
def worker(folder, tmp_path):
    config = ServerConfig(
        model_id=str(folder),
        served_model_names=("m",),
        runtime_dir=str(tmp_path / f"w{uuid.uuid4().hex[:6]}"),
        max_concurrent_requests=ROWS,
        max_top_n_tokens=VOCAB,
        max_batch_prefill_tokens=512,
        max_batch_total_tokens=256 * BLOCK,
        max_total_tokens=64,
        block_size=BLOCK,
    )
    worker = Worker(0, config, logging.getLogger("worker-0"))
    worker.device = "cpu"
    worker.runner = ModelRunner(str(folder), "float32", "cpu", 256, BLOCK, max_rows=ROWS, max_total_tokens=64)
    worker.open_buffers()
    yield worker
    worker.results.close()
    worker.steps.close()
    remove_stale(config.shm_prefix)


def widest_step(config: ServerConfig) -> tuple[m.StepRequest, TensorRing]:
    """Every row asks for every token of the vocabulary as its top tokens."""
    policy = SchedulePolicy(BlockManager(256, BLOCK), 512, ROWS, (), 64)
    for i in range(ROWS):
        policy.add(Request(f"r{i}", [1, 2 + i], m.SamplingParams(top_n_tokens=VOCAB), 4))
    step = build_step(policy.schedule(), BLOCK)
    ring = TensorRing(f"{config.shm_prefix}-step", RING_SLOTS, 1 << 20, "cpu")
    buffer, refs, handle = ring.write(step.to_tensors())
    return m.StepRequest(1, "boot", buffer, refs, handle, step.grammars), ring


def test_a_result_over_a_mebibyte_comes_back(worker):
    msg, ring = widest_step(worker.config)
    answer = worker.run_step(msg)
    assert isinstance(answer, m.StepResult), answer
    reader = TensorReader("cpu")
    out = StepOutput.from_tensors(reader.read(answer.buffer, answer.tensors, answer.cuda_handle))
    nbytes = sum(t.numel() * t.element_size() for t in out.to_tensors().values())
    assert nbytes > 1 << 20 and nbytes < result_buffer_size(ROWS, VOCAB, 512)
    assert out.top_ids.shape == (ROWS, VOCAB) and not out.failed.any()
    assert out.top_ids[:, 0].tolist() == out.next_ids.tolist()  # greedy: the most likely token
    reader.close()
    ring.close()


def test_a_result_its_buffer_cannot_hold_fails_the_step_not_the_worker(worker):
    msg, ring = widest_step(worker.config)
    worker.results.close()
    worker.results = TensorRing(f"{worker.config.shm_prefix}-small", RING_SLOTS, 1 << 20, "cpu")
    answer = worker.run_step(msg)
    assert isinstance(answer, m.WorkerFailure) and "more than the 1048576 bytes" in answer.message
    ring.close()


def test_a_worker_with_fewer_kv_blocks_than_configured_is_refused_not_a_crash(tmp_path, caplog):
    """Seen from the scheduler (``WorkerGroup.loaded``): it used to raise, and the scheduler died at
    every announcement of that worker, every second, taking every request in flight with it."""
    from tgi_zmq.worker_group import WorkerGroup

    config = ServerConfig(model_id="none", served_model_names=("m",), runtime_dir=str(tmp_path / "g"))
    group = WorkerGroup(config, sock=None)
    try:
        short = m.WorkerReady(0, "boot-1", 1, config.num_blocks - 1)
        with caplog.at_level(logging.ERROR):
            assert not group.loaded(short) and not group.loaded(short)  # refused, then ignored
        assert not group.ready and caplog.text.count("fewer than configured") == 1
        assert group.loaded(m.WorkerReady(0, "boot-2", 2, config.num_blocks)) and group.ready
    finally:
        group.close()
