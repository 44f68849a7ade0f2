"""--nnodes, without a service: where each node's processes reach node 0, the ranks each node runs, a
step's tensors carried in a message, and a join that gets no answer."""

from __future__ import annotations

import time

import pytest
import torch

from tests.conftest import free_port, free_ports_below_ephemeral
from tgi_zmq import nodes
from tgi_zmq.config import ServerConfig
from tgi_zmq.transport import FrameBuffer, TensorRing


def config(**fields) -> ServerConfig:
    return ServerConfig("model", ("m",), "/tmp/run", **fields)


def test_each_node_runs_its_share_of_the_ranks_and_reaches_node_0_over_tcp():
    node0 = config(num_shard=4, nnodes=2, master_addr="10.0.0.1", master_port=29500)
    node1 = config(num_shard=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29500)
    assert (node0.local_ranks, node1.local_ranks) == (range(0, 2), range(2, 4))
    assert node0.endpoint("worker") == "ipc:///tmp/run/worker.sock"  # node 0's own ranks: ipc
    assert node0.node0_tcp("worker") == "tcp://*:29501" and node0.node0_tcp("frontend") == "tcp://*:29502"
    assert node1.endpoint("worker") == "tcp://10.0.0.1:29501"
    assert node1.endpoint("frontend") == "tcp://10.0.0.1:29502"
    assert node1.endpoint("tokenizer") == "ipc:///tmp/run/tokenizer.sock"  # none on node 1: never used
    single = config(num_shard=2)
    assert single.local_ranks == range(2) and single.node0_tcp("worker") is None


def test_a_joining_node_takes_node_0s_configuration_with_its_own_place():
    node0 = config(num_shard=2, nnodes=2, max_batch_total_tokens=4096, master_addr="localhost")
    joined = nodes.node_config(ServerConfig.from_json(node0.to_json()), 1, 2, "10.0.0.1")
    assert (joined.node_rank, joined.master_addr, joined.local_ranks) == (1, "10.0.0.1", range(1, 2))
    assert joined.max_batch_total_tokens == 4096 and joined.model_id == "model"
    with pytest.raises(ValueError, match="node 0 runs --nnodes 2; this launch says --nnodes 3"):
        nodes.node_config(node0, 1, 3, "10.0.0.1")


def test_a_join_without_node_0_fails_with_a_clear_message():
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"node 0 did not answer at tcp://127.0.0.1:\d+ within 2 s"):
        nodes.join(1, "127.0.0.1", free_ports_below_ephemeral(2), timeout=2)
    assert time.monotonic() - started < 5


def test_a_step_sent_with_its_tensors_reads_as_from_shared_memory():
    ring = TensorRing(f"tgi-zmq-test-frames-{free_port()}", 2, 1 << 16)
    try:
        tensors = {
            "ids": torch.arange(7, dtype=torch.int64),
            "temps": torch.rand(3, dtype=torch.float32),
            "mask": torch.tensor([True, False]),
            "empty": torch.empty(0, dtype=torch.int32),
        }
        name, refs, _ = ring.write(tensors)
        frame = ring.copy(name, refs)
        assert len(frame) < 256  # the packed bytes only, not the slot
        read = FrameBuffer(frame).read(refs)
        assert all(torch.equal(read[key], value) for key, value in tensors.items())
    finally:
        ring.close()
