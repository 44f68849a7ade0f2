"""End to end, batch invariance (``--deterministic``): 32 greedy and seeded requests get the same tokens
sent one at a time, all 32 at once, and beside a long prompt that is prefilled in chunks, in bfloat16
and from the Q4_1 GGUF. The prompts are shorter than a KV block, so no phase reads another's
prefix cache: every phase computes every prompt. The kernels and the engine in process (8-bit and 4-bit
weights too): tests/test_batch_invariance.py; a replay after a kill, in bfloat16 and on two float32 ranks:
tests/test_e2e_faults.py."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import free_port, start_service, stop_service
from tests.test_e2e_quantize import assert_says_paris
from tgi_zmq.convert import find_bundled_gguf

pytestmark = pytest.mark.e2e

WORDS = "river model light paris seven orange quietly build window engine north garden".split()
PROMPTS = [" ".join(WORDS[(i + j * 5) % len(WORDS)] for j in range(2 + i % 5)) for i in range(32)]
LONG = " ".join(WORDS[(j * 7) % len(WORDS)] for j in range(700))  # 758 tokens: chunks of 256
MAX_NEW = 4


def generate(service, i: int) -> list[int]:
    sampled = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "seed": 1000 + i} if i % 2 == 0 else {}
    body = {"inputs": PROMPTS[i], "parameters": {"max_new_tokens": MAX_NEW, "details": True, **sampled}}
    response = requests.post(service.url + "/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def long_prompt(service) -> int:
    body = {"inputs": LONG, "parameters": {"max_new_tokens": 2}}
    return requests.post(service.url + "/generate", json=body, timeout=300).status_code


def assert_invariant(service) -> None:
    assert requests.get(service.url + "/info", timeout=10).json()["deterministic"] is True
    rows = range(len(PROMPTS))
    alone = [generate(service, i) for i in rows]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # at most 32 in flight (the faulty service's limit)
        together = list(pool.map(lambda i: generate(service, i), rows))
        long = pool.submit(long_prompt, service)
        time.sleep(0.3)  # its first chunk is in a step when the 32 arrive
        beside = list(pool.map(lambda i: generate(service, i), rows))
        assert long.result() == 200
    assert sum(a == t for a, t in zip(alone, together, strict=True)) == len(PROMPTS)
    assert sum(a == b for a, b in zip(alone, beside, strict=True)) == len(PROMPTS)


def test_bfloat16_tokens_do_not_depend_on_the_batch(faulty):
    assert_invariant(faulty)  # bfloat16, --deterministic auto: on with float weights


def test_the_q4_1_gguf_tokens_do_not_depend_on_the_batch_and_say_paris(tmp_path):
    gguf = find_bundled_gguf()
    service = start_service(
        tmp_path,
        *("--model-id", str(gguf), "--dtype", "bfloat16"),
        *("--deterministic", "on", "--master-port", str(free_port()), "--max-batch-prefill-tokens", "256"),
        *("--max-batch-total-tokens", "8192", "--max-total-tokens", "1024"),
    )
    try:
        assert_invariant(service)
        assert_says_paris(service, gguf)
    finally:
        stop_service(service, wait=False)
