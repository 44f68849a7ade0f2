"""The second real model, Gemma 3 270M, served from its Q4_K_M GGUF as it is (its 4-, 5-, 6- and 8-bit
blocks kept, our int8/int4 kernels), against transformers' ``Gemma3ForCausalLM`` on the same file's
dequantized weights (float32): its greedy tokens alone and in one batch, on one rank (in this process)
and two (the service), its perplexity, and the chat routes of a base model without a chat template.

transformers' tokens are checked by teacher forcing: each of our continuations must be transformers'
argmax at every position (one forward per prompt instead of 64 steps of a 262k-vocabulary head).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from tests.conftest import spawn_service, stop_service
from tests.helpers import run_engine
from tgi_zmq.checkpoint.gguf_file import shared_gguf_reader
from tgi_zmq.convert import prepare_gguf_folder, second_model_gguf
from tgi_zmq.messages import SamplingParams
from tgi_zmq.model_runner import ModelRunner

pytestmark = pytest.mark.e2e

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "import numpy as np\nx =",
    "The largest planet in our solar system",
    "My favourite recipe for pancakes:",
]
MAX_NEW = 64
ALICE = Path(__file__).parent / "data" / "alice-chapters-1-2.txt"
PPL_CHARS = 700  # about 170 tokens


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(the service on two ranks, transformers' model, the tokenizer): the service starts while
    transformers dequantizes the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = second_model_gguf()
    folder = prepare_gguf_folder(gguf)
    service = spawn_service(
        tmp_path_factory.mktemp("gemma3"),
        *("--model-id", str(gguf), "--dtype", "float32", "--num-shard", "2", "--torch-threads", "1"),
        *("--max-batch-total-tokens", "8192", "--enable-prefill-logprobs"),
    )
    try:
        with shared_gguf_reader(gguf):  # one parse of the file's metadata, not three
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        service.wait_healthy(timeout=300)
        yield service, model.eval(), AutoTokenizer.from_pretrained(folder), folder
    finally:
        stop_service(service, wait=False)


def assert_transformers_greedy(model, prompt: list[int], continuation: list[int]) -> None:
    """``continuation`` is transformers' greedy one: its argmax after the prompt and each token."""
    with torch.no_grad():
        hidden = model.model(torch.tensor([prompt + continuation])).last_hidden_state[0]
        logits = model.lm_head(hidden[len(prompt) - 1 : -1])
    assert logits.argmax(-1).tolist() == continuation


def generated_ids(url: str, text: str) -> list[int]:
    body = {"inputs": text, "parameters": {"max_new_tokens": MAX_NEW, "details": True, "stop": []}}
    response = requests.post(url + "/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_greedy_tokens_equal_transformers_on_two_ranks_alone_and_batched(gemma3):
    service, model, tokenizer, _ = gemma3
    alone = generated_ids(service.url, TEXTS[0])
    with ThreadPoolExecutor(len(TEXTS)) as pool:
        batched = list(pool.map(lambda t: generated_ids(service.url, t), TEXTS))
    assert batched[0] == alone
    for text, ids in zip(TEXTS, batched, strict=True):
        assert len(ids) == MAX_NEW or ids[-1] == tokenizer.eos_token_id
        assert_transformers_greedy(model, tokenizer(text)["input_ids"], ids)


def test_greedy_tokens_equal_transformers_on_one_rank_alone_and_batched(gemma3):
    _, model, tokenizer, folder = gemma3
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    greedy = [SamplingParams()] * len(prompts)
    runner = ModelRunner(str(folder), "float32", "cpu", 200, 16, max_rows=64, max_total_tokens=10_000)
    pages = {"num_blocks": 200, "block_size": 16, "runner": runner}  # one load for both runs
    batched, _ = run_engine(folder, prompts, greedy, MAX_NEW, max_step_tokens=128, **pages)
    alone, _ = run_engine(folder, prompts[:1], greedy[:1], MAX_NEW, **pages)
    assert batched[0] == alone[0]
    for prompt, ids in zip(prompts, batched, strict=True):
        assert_transformers_greedy(model, prompt, ids)


def test_perplexity_is_within_one_percent_of_transformers(gemma3):
    service, model, tokenizer, _ = gemma3
    text = ALICE.read_text()[:PPL_CHARS]
    ids = tokenizer(text)["input_ids"]
    body = {"inputs": text, "parameters": {"max_new_tokens": 1, "decoder_input_details": True}}
    response = requests.post(service.url + "/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    prefill = response.json()["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids  # the same tokens scored (the BOS first, unscored)
    ours = math.exp(-sum(t["logprob"] for t in prefill[1:]) / (len(ids) - 1))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    theirs = math.exp(nll.item())
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)


def test_the_tokenizer_is_gemmas(gemma3):
    """Gemma's SentencePiece BPE vocabulary read as BPE (transformers 4.57 reads GGUF's as Unigram):
    the ids transformers 5.19 gives (and Google's tokenizer.json), spaces and tabs included."""
    tokenizer = gemma3[2]
    assert tokenizer("The capital of France is")["input_ids"] == [2, 818, 5279, 529, 7001, 563]
    assert tokenizer("a  b\tc")["input_ids"] == [2, 236746, 138, 236763, 255968, 236755]
    assert tokenizer.decode([818, 5279, 138, 255968]) == "The capital  \t"


def test_a_chat_to_a_model_without_template_is_a_422_template_error(gemma3):
    service = gemma3[0]
    body = {"model": "tgi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    response = requests.post(service.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 422
    assert response.json() == {"error": "Template error: template not found", "error_type": "template_error"}
