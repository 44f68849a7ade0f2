"""End to end, tensor parallelism: SmolLM2 over 2 worker processes (gloo) answers as one does,
each rank holding about half of the weights (a rank killed under load: tests/test_e2e_faults.py;
every architecture on two ranks, in process: tests/test_parallel.py)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tgi_zmq.memory import weights_bytes

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colours:"]


def greedy(service, prompt: str) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 20, "details": True}}
    response = requests.post(service.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_two_shards_give_the_tokens_of_one_and_each_holds_half_of_the_weights(sharded_service, service):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        two = list(pool.map(lambda p: greedy(sharded_service, p), PROMPTS))
    assert two == [greedy(service, p) for p in PROMPTS]
    # The ranks really split SmolLM2 (9 query heads over 3 KV heads: 6 + 3 and 2 + 1), as each logs.
    whole = weights_bytes(sharded_service.model_dir, "float32") / 2**20
    loaded = re.findall(r"worker-(\d) loaded in .*?weights ([\d.]+) MiB", sharded_service.log())
    per_rank = {int(rank): float(mib) for rank, mib in loaded}  # the last load of each (a rank may restart)
    assert sorted(per_rank) == [0, 1]
    assert all(0.4 * whole < mib < 0.6 * whole for mib in per_rank.values()), (whole, per_rank)
