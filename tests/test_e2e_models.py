"""End to end, each architecture: the real service on a random tiny model gives transformers' greedy tokens
(on two tensor-parallel ranks: in process, tests/test_parallel.py; the service on two ranks:
tests/test_e2e_parallel.py).

The tiny models use SmolLM2's tokenizer (copied beside the weights), so prompts are text as
for any client; transformers gets the same token ids.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import start_service, stop_service
from tests.helpers import ARCHITECTURES, hf_greedy
from tgi_zmq import models
from tgi_zmq.models.gemma import GemmaModel
from tgi_zmq.models.llama import LlamaModel

pytestmark = pytest.mark.e2e

WORDS = "the river model light paris seven orange quietly build window engine north".split()
PROMPTS = [" ".join(WORDS[i : i + 3 + i % 4]) for i in range(12)]
MAX_NEW = 10
# One architecture per model class served end to end (a service each), but the classes a real model
# serves: Llama's (SmolLM2, the shared service: tests/test_e2e_generation.py) and Gemma's
# (tests/test_e2e_gemma3.py); every architecture is checked in process against transformers
# (tests/test_models.py, tests/test_parallel.py).
CLASSES = {models.ARCHITECTURES[arch][1]: arch for arch in reversed(ARCHITECTURES)}
SERVED = sorted(arch for cls, arch in CLASSES.items() if cls not in (GemmaModel, LlamaModel))


@pytest.fixture(scope="module", params=SERVED)
def served(request, tiny_models, tmp_path_factory):
    """(service, model folder, tokenizer) for a random tiny model of one architecture."""
    from transformers import AutoTokenizer

    folder = tiny_models(request.param, smol_tokenizer=True, vocab_size=49152)
    service = start_service(
        tmp_path_factory.mktemp("service"),
        *("--model-id", str(folder), "--dtype", "float32"),
        *("--max-batch-total-tokens", "8192", "--max-total-tokens", "512"),
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


def test_smollm2_in_bfloat16_still_says_paris(faulty):
    """The shared bfloat16 service (tests/conftest.py's ``faulty``)."""
    info = requests.get(faulty.url + "/info", timeout=10).json()
    assert info["model_dtype"] == "bfloat16"
    body = {
        "model": "tgi",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 30,
        "temperature": 0,  # greedy (TGI's chat route samples by default)
    }
    response = requests.post(faulty.url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["message"]["content"]
