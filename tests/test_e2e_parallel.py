"""End to end, tensor parallelism: SmolLM2 over 2 worker processes (gloo) answers as one does,
each rank holds half the weights (a rank killed under load: tests/test_e2e_faults.py)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import free_port, start_service, stop_service
from tgi_zmq.memory import weights_bytes

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colours:"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    svc = start_service(
        tmp_path_factory.mktemp("sharded"),
        *("--num-shard", "2", "--master-port", str(free_port()), "--dtype", "float32"),
        *("--max-batch-total-tokens", "16384", "--max-total-tokens", "2048"),
    )
    yield svc
    stop_service(svc, wait=False)


def greedy(service, prompt: str) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 20, "details": True}}
    response = requests.post(service.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_two_shards_give_the_tokens_of_one(sharded, service):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(lambda p: greedy(sharded, p), PROMPTS)) == [greedy(service, p) for p in PROMPTS]


def test_each_rank_holds_about_half_of_the_weights(sharded):
    whole = weights_bytes(sharded.model_dir, "float32") / 2**20
    per_rank = {
        int(r): float(mib)
        for r, mib in re.findall(r"worker-(\d) loaded in .*?weights ([\d.]+) MiB", sharded.log())
    }
    assert sorted(per_rank) == [0, 1]
    assert all(0.4 * whole < mib < 0.6 * whole for mib in per_rank.values()), (whole, per_rank)
