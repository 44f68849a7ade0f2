"""End to end, each architecture: the real service on a random tiny model gives transformers' greedy tokens,
on one worker and on two tensor-parallel shards.

The tiny models use SmolLM2's tokenizer (copied beside the weights), so prompts are text as
for any client; transformers gets the same token ids.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import free_port, start_service, stop_service
from tests.helpers import ARCHITECTURES, hf_greedy, tiny_model
from tgi_zmq.convert import ensure_default_model

pytestmark = pytest.mark.e2e

WORDS = "the river model light paris seven orange quietly build window engine north".split()
PROMPTS = [" ".join(WORDS[i : i + 3 + i % 4]) for i in range(12)]
MAX_NEW = 10


@pytest.fixture(scope="module", params=[(arch, shards) for arch in ARCHITECTURES for shards in (1, 2)])
def served(request, tmp_path_factory):
    """(service, model folder, tokenizer) for a random tiny model of one architecture, on 1 or 2 shards."""
    from transformers import AutoTokenizer

    arch, shards = request.param
    folder = tiny_model(arch, tmp_path_factory.mktemp(arch), vocab_size=49152)
    smol = ensure_default_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smol / name).exists():
            shutil.copy(smol / name, folder / name)
    service = start_service(
        tmp_path_factory.mktemp("service"),
        *("--model-id", str(folder), "--dtype", "float32"),
        *("--max-batch-total-tokens", "8192", "--max-total-tokens", "512"),
        *("--num-shard", str(shards), "--master-port", str(free_port())),
    )
    yield service, folder, AutoTokenizer.from_pretrained(folder)
    stop_service(service, wait=False)


def generated_ids(service, prompt: str) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
    response = requests.post(service.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_greedy_tokens_equal_transformers_alone_and_12_concurrent(served):
    service, folder, tokenizer = served
    expected = [hf_greedy(folder, tokenizer(p)["input_ids"], MAX_NEW, stop_at_eos=True) for p in PROMPTS]
    assert generated_ids(service, PROMPTS[0]) == expected[0]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(lambda p: generated_ids(service, p), PROMPTS)) == expected


def test_smollm2_in_bfloat16_still_says_paris(tmp_path):
    service = start_service(tmp_path, "--dtype", "bfloat16", "--max-batch-total-tokens", "8192")
    try:
        info = requests.get(service.url + "/info", timeout=10).json()
        assert info["model_dtype"] == "bfloat16"
        body = {
            "model": "tgi",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 30,
            "temperature": 0,  # greedy (TGI's chat route samples by default)
        }
        response = requests.post(service.url + "/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert "Paris" in response.json()["choices"][0]["message"]["content"]
    finally:
        stop_service(service, wait=False)
