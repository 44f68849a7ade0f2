"""End to end, every ``--quantize`` value through the real service on a tiny model (its greedy tokens are
transformers' on the dequantized weights, on one rank and two) and the launcher's refusals. The default
model from its own Q4_1 GGUF file: tests/test_e2e_invariance.py (``assert_says_paris``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, start_service, stop_service
from tests.helpers import hf_greedy, tiny_model
from tests.quant_checkpoints import write_awq_checkpoint, write_dequantized_reference, write_gptq_checkpoint
from tests.test_e2e_models import MAX_NEW, generated_ids
from tests.test_quantize import dequantized_reference
from tgi_zmq.convert import ensure_default_model

pytestmark = pytest.mark.e2e

PROMPTS = ["the river model light", "paris seven orange quietly build", "window engine north"]
STORAGE = {"bitsandbytes": "int8", "eetq": "int8", "bitsandbytes-nf4": "nf4", "bitsandbytes-fp4": "fp4"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Llama with SmolLM2's tokenizer; 128 wide so that each of two ranks' input slices holds
    whole 64-input groups (then two ranks quantize exactly as one)."""
    folder = tiny_model(
        "llama", tmp_path_factory.mktemp("tiny"), vocab_size=49152, hidden_size=128, intermediate_size=256
    )
    _copy_tokenizer(folder)
    return folder


def _copy_tokenizer(folder: Path) -> None:
    smol = ensure_default_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smol / name).exists():
            shutil.copy(smol / name, folder / name)


def _serve_and_compare(tmp_path: Path, model: Path, reference: Path, *flags: str) -> dict:
    """Start the service on ``model`` with ``flags``; its tokens (alone, then 3 at once) must be
    transformers' greedy tokens on ``reference``. Returns /info."""
    from transformers import AutoTokenizer

    tmp_path.mkdir(exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    expected = [hf_greedy(reference, tokenizer(p)["input_ids"], MAX_NEW, stop_at_eos=True) for p in PROMPTS]
    service = start_service(
        tmp_path,
        *("--model-id", str(model), "--dtype", "float32", "--max-batch-total-tokens", "4096"),
        *("--max-total-tokens", "512", "--master-port", str(free_port()), *flags),
    )
    try:
        assert generated_ids(service, PROMPTS[0]) == expected[0]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(lambda p: generated_ids(service, p), PROMPTS)) == expected
        return requests.get(service.url + "/info", timeout=10).json()
    finally:
        stop_service(service, wait=False)


# The 8-bit and the 4-bit storage through the service once each, the 4-bit one on two ranks. ``eetq`` is
# the int8 method of ``bitsandbytes`` on the CPU (only the name differs), and nf4 and fp4 differ only by
# their code table: a launch each would test nothing new (every value and architecture in process:
# tests/test_quantize.py).
@pytest.mark.parametrize("quantize,shards", [("bitsandbytes", 1), ("bitsandbytes-nf4", 2)])
def test_each_quantize_value_serves_the_tokens_of_its_dequantized_weights(tiny, quantize, shards, tmp_path):
    reference = dequantized_reference(tiny, tmp_path / "reference", STORAGE[quantize])
    flags = ("--quantize", quantize, "--num-shard", str(shards))
    info = _serve_and_compare(tmp_path / "service", tiny, reference, *flags)
    assert info["quantize"] == quantize


# GPTQ's checkpoint through the service; AWQ's differs in its layout, read by the same loader (both in
# process, every architecture: tests/test_quantize.py, tests/test_gptq.py).
@pytest.mark.parametrize("method", ["gptq"])
def test_prequantized_checkpoints_are_found_and_served(tiny, method, tmp_path):
    write = write_gptq_checkpoint if method == "gptq" else write_awq_checkpoint
    checkpoint = tmp_path / method
    write(tiny, checkpoint, group=32)
    _copy_tokenizer(checkpoint)
    reference = tmp_path / "reference"
    write_dequantized_reference(checkpoint, reference)
    info = _serve_and_compare(tmp_path / "service", checkpoint, reference, "--quantize", method)
    assert info["quantize"] == method


def assert_says_paris(service, gguf: Path) -> None:
    info = requests.get(service.url + "/info", timeout=10).json()
    assert info["quantize"] == "gguf" and info["model_id"] == str(gguf)
    body = {
        "model": "tgi",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 30,
        "temperature": 0,
    }
    response = requests.post(service.url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["message"]["content"]


def test_the_launcher_refuses_what_this_device_cannot_run():
    """The exit status and the message a user sees (every refusal's text: tests/test_quantize.py)."""
    launch = [sys.executable, "-m", "tgi_zmq.cli", "launch", "--port", str(free_port()), "--quantize", "fp8"]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert (
        "--quantize fp8 needs a CUDA GPU of compute capability 8.9 or more; this cpu can run:" in done.stderr
    )
