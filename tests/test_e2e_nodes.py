"""End to end: one tensor-parallel group on two "hosts", two launches on loopback (`--nnodes 2`, node
ranks 0 and 1, one rank each): the tokens of `--num-shard 2` on one node and of one rank, and a rank of
node 1 killed -9 heals, through node 1's agent, to the same tokens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import Service, children, free_ports_below_ephemeral, start_service, stop_service

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "Once upon a time, a fox"]
NEW_TOKENS = 8
LIMITS = ("--dtype", "float32", "--max-batch-total-tokens", "8192", "--max-total-tokens", "1024")
# one thread a rank: both "hosts" share this machine's cores (on hosts of their own, leave it out)
NODE0 = ("--num-shard", "2", "--nnodes", "2", "--torch-threads", "1", *LIMITS)


def tokens(service: Service, prompt: str) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
    response = requests.post(service.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Iterator[tuple[Service, subprocess.Popen]]:
    # node 1 connects to node 0's scheduler at master + 1 before it is up: a port the kernel never
    # gives as a client's own (free_ports_below_ephemeral)
    folder, master = tmp_path_factory.mktemp("nodes"), str(free_ports_below_ephemeral(3))
    launch = [sys.executable, "-m", "tgi_zmq.cli", "launch", "--num-shard", "2", "--nnodes", "2"]
    with open(folder / "node1.log", "wb") as log:  # node 1 waits for node 0 to answer its join
        node1 = subprocess.Popen(
            [*launch, "--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port", master],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
            start_new_session=True,
        )
    try:
        node0 = start_service(folder, "--master-port", master, *NODE0)
    except BaseException:
        node1.send_signal(signal.SIGTERM)
        node1.wait(timeout=30)
        raise
    yield node0, node1
    node1.send_signal(signal.SIGTERM)
    stop_service(node0, wait=False)
    node1.wait(timeout=30)


def test_two_nodes_give_the_tokens_of_one_node_and_of_one_rank(two_nodes, sharded_service, service):
    node0, _ = two_nodes
    across = [tokens(node0, p) for p in PROMPTS]
    assert across == [tokens(sharded_service, p) for p in PROMPTS]
    assert across == [tokens(service, p) for p in PROMPTS]
    assert "node 1 joins" in node0.log()


def test_a_rank_killed_on_node_1_heals_to_the_same_tokens(two_nodes):
    node0, node1 = two_nodes
    reference = [tokens(node0, p) for p in PROMPTS]
    (supervisord,) = children(node1.pid)
    (rank1,) = children(supervisord, "processes/worker.py")
    (agent,) = children(supervisord, "processes/node.py")
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # in flight through the kill: replayed, same tokens
        answers = pool.map(lambda p: tokens(node0, p), PROMPTS)
        time.sleep(0.5)
        os.kill(rank1, signal.SIGKILL)
        assert list(answers) == reference
    assert "restarting the workers" in node0.log()  # the whole group restarted
    assert [tokens(node0, p) for p in PROMPTS] == reference
    assert agent in children(supervisord, "processes/node.py")  # the agent lived through it


def test_a_node_rank_out_of_range_is_refused_at_launch():
    launch = [sys.executable, "-m", "tgi_zmq.cli", "launch", "--num-shard", "2", "--nnodes", "2"]
    done = subprocess.run([*launch, "--node-rank", "3"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--node-rank 3 is out of range for --nnodes 2: 0 to 1" in done.stderr + done.stdout
