"""End to end: the real service's greedy tokens equal transformers', alone, streamed and concurrent."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from tests.helpers import FrequencyPenalty

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village",
    "List three colours:",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def reference(service):
    """transformers' greedy continuation (token ids) of every prompt, same float32 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(service.model_dir)
    model = AutoModelForCausalLM.from_pretrained(service.model_dir, torch_dtype=torch.float32).eval()

    def greedy(ids: list[int], n: int, **kwargs) -> list[int]:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=2, **kwargs)
        return out[0, len(ids) :].tolist()

    expected = {p: greedy(tok(p)["input_ids"], 24) for p in PROMPTS}
    penalties = dict(repetition_penalty=1.3, logits_processor=[FrequencyPenalty(0.5)])
    expected["penalised"] = greedy(tok(PROMPTS[3])["input_ids"], 24, **penalties)
    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    expected["chat"] = tok.decode(greedy(chat_ids, 30), skip_special_tokens=True)
    return expected


def generate(service, prompt: str, **params) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 24, "details": True, **params}}
    response = requests.post(service.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def stream(service, prompt: str, **params) -> list[dict]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 24, "details": True, **params}}
    with requests.post(service.url + "/generate_stream", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200
        return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]


def token_ids(result: dict) -> list[int]:
    return [t["id"] for t in result["details"]["tokens"]]


def test_greedy_equals_transformers(service, reference):
    for prompt in PROMPTS:
        result = generate(service, prompt)
        assert token_ids(result) == reference[prompt], prompt
        assert result["details"]["finish_reason"] in ("length", "eos_token")


def test_chat_says_paris_like_transformers(service, reference):
    body = {"model": "tgi", "messages": CHAT, "max_tokens": 30, "temperature": 0}
    response = requests.post(service.url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["message"]["content"]
    assert answer == reference["chat"]
    assert "Paris" in answer


def test_stream_equals_non_stream(service):
    for prompt in PROMPTS[:2]:
        whole = generate(service, prompt)
        events = stream(service, prompt)
        assert [e["index"] for e in events] == list(range(1, len(events) + 1))
        assert [e["token"]["id"] for e in events] == token_ids(whole)
        assert events[-1]["generated_text"] == whole["generated_text"]
        assert all(e["generated_text"] is None for e in events[:-1])
        assert events[-1]["details"]["generated_tokens"] == whole["details"]["generated_tokens"]


def test_concurrent_requests_equal_solo(service, reference):
    prompts = PROMPTS * 3
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: generate(service, p), prompts))
    for prompt, result in zip(prompts, results, strict=True):
        ids = token_ids(result)
        assert ids == reference[prompt], prompt


def test_seeded_sampling_is_reproducible(service):
    params = {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "seed": 1234}
    first = generate(service, PROMPTS[2], **params)
    with ThreadPoolExecutor(4) as pool:
        others = list(pool.map(lambda _: generate(service, PROMPTS[2], **params), range(4)))
    assert all(o["generated_text"] == first["generated_text"] for o in others)
    assert first["details"]["seed"] == 1234
    different = generate(service, PROMPTS[2], **{**params, "seed": 99})
    assert different["generated_text"] != first["generated_text"]


def test_stop_sequence_is_kept_and_ends_generation(service, reference):
    full = generate(service, PROMPTS[0])["generated_text"]
    word = full.split()[1]
    result = generate(service, PROMPTS[0], stop=[word])
    assert result["details"]["finish_reason"] == "stop_sequence"
    assert result["generated_text"].endswith(word)
    assert full.startswith(result["generated_text"])


def test_penalties_and_top_k_reach_the_sampler(service, reference):
    """The parameters travel to the workers (the sampler against transformers: tests/test_models.py,
    tests/test_sampler.py)."""
    penalised = generate(service, PROMPTS[3], repetition_penalty=1.3, frequency_penalty=0.5)
    assert token_ids(penalised) == reference["penalised"]
    assert reference["penalised"] != reference[PROMPTS[3]]  # the penalties change tokens: the test can tell
    assert penalised["details"]["seed"] is None  # greedy
    top_1 = generate(service, PROMPTS[3], do_sample=True, top_k=1, seed=3)
    assert token_ids(top_1) == reference[PROMPTS[3]]  # one candidate left: the greedy token
    assert top_1["details"]["seed"] == 3
