"""End to end: the sampling parameters and logprobs of issue 11 through the real float32 service, each
against transformers on the same weights (its logits processor of the same name, its log-softmax),
with the real clients (`text-generation`, `huggingface_hub.InferenceClient`)."""

from __future__ import annotations

import functools
import json

import pytest
import requests
import torch

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is"


@functools.cache
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def hf_greedy(service, prompt: str, n: int, **kwargs) -> list[int]:
    model, tok = hf(service.model_dir)
    ids = tok(prompt)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=2, **kwargs)
    return out[0, len(ids) :].tolist()


def generate(service, prompt: str = PROMPT, **params) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True, **params}}
    response = requests.post(service.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def ids_of(result: dict) -> list[int]:
    return [t["id"] for t in result["details"]["tokens"]]


def test_prefill_and_top_tokens_are_transformers_logprobs(service):
    """decoder_input_details: each prompt token's logprob; top_n_tokens: the most likely next tokens."""
    model, tok = hf(service.model_dir)
    result = generate(service, decoder_input_details=True, top_n_tokens=3)
    prompt_ids = tok(PROMPT)["input_ids"]
    generated = ids_of(result)
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt_ids + generated])).logits[0].log_softmax(-1)
    prefill = result["details"]["prefill"]
    assert [t["id"] for t in prefill] == prompt_ids and prefill[0]["logprob"] is None
    for i, token in enumerate(prefill[1:], start=1):
        assert token["logprob"] == pytest.approx(logprobs[i - 1, prompt_ids[i]].item(), abs=1e-3)
    assert "".join(t["text"] for t in prefill) == PROMPT
    for step, top in enumerate(result["details"]["top_tokens"]):
        position = len(prompt_ids) - 1 + step
        expected = logprobs[position].topk(3)
        assert [t["id"] for t in top] == expected.indices.tolist()
        assert [t["logprob"] for t in top] == pytest.approx(expected.values.tolist(), abs=1e-3)
        assert top[0]["id"] == generated[step]  # greedy: the first is the chosen one


def test_clients_get_top_tokens_streamed_and_not(service, hub_online):
    from huggingface_hub import InferenceClient
    from text_generation import Client

    out = Client(service.url, timeout=120).generate(
        PROMPT, max_new_tokens=4, top_n_tokens=2, decoder_input_details=True
    )
    assert [len(top) for top in out.details.top_tokens] == [2] * 4
    assert [t.text for t in out.details.prefill] == ["The", " capital", " of", " France", " is"]
    events = list(
        InferenceClient(base_url=service.url).text_generation(
            PROMPT, max_new_tokens=4, top_n_tokens=2, stream=True, details=True
        )
    )
    assert [[t.id for t in e.top_tokens] for e in events] == [
        [t.id for t in top] for top in out.details.top_tokens
    ]
    refused = requests.post(
        service.url + "/generate", json={"inputs": "x", "parameters": {"top_n_tokens": 99}}, timeout=30
    )
    assert refused.status_code == 422 and "`top_n_tokens` must be >= 0 and <= 5" in refused.json()["error"]


def test_watermark_min_tokens_and_stop_token_ids_match_transformers(service):
    from transformers import WatermarkingConfig

    watermark = WatermarkingConfig(greenlist_ratio=0.5, bias=2.0, seeding_scheme="lefthash", context_width=1)
    marked = ids_of(generate(service, watermark=True))
    assert marked == hf_greedy(service, PROMPT, 8, watermarking_config=watermark)
    assert marked != hf_greedy(service, PROMPT, 8)  # the watermark changed the text: the test can tell

    chat = "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n"
    short = generate(service, chat, max_new_tokens=30)
    assert short["details"]["finish_reason"] == "eos_token"
    n = short["details"]["generated_tokens"] + 4
    longer = generate(service, chat, max_new_tokens=n + 5, min_tokens=n)
    assert longer["details"]["generated_tokens"] >= n
    assert ids_of(longer)[:n] == hf_greedy(service, chat, n, min_new_tokens=n)

    plain = ids_of(generate(service))
    cut = generate(service, stop_token_ids=[plain[3]])
    assert ids_of(cut) == plain[: plain.index(plain[3]) + 1]
    assert cut["details"]["finish_reason"] == "eos_token"


def test_best_of_answers_the_best_copy_and_typical_p_samples(service):
    result = generate(service, best_of=3, do_sample=True, typical_p=0.5, max_new_tokens=6)
    others = result["details"]["best_of_sequences"]
    assert len(others) == 2
    mean = lambda d: sum(t["logprob"] for t in d["tokens"]) / len(d["tokens"])  # noqa: E731
    assert all(mean(result["details"]) >= mean(other) for other in others)
    seeds = {result["details"]["seed"], *(other["seed"] for other in others)}
    assert len(seeds) == 3
    again = generate(service, seed=result["details"]["seed"], do_sample=True, typical_p=0.5, max_new_tokens=6)
    assert again["generated_text"] == result["generated_text"]  # each copy is reproducible from its seed
    refused = requests.post(
        service.url + "/generate_stream",
        json={"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}},
        timeout=30,
    )
    assert refused.status_code == 422
    assert json.loads(refused.text)["error"].endswith("`best_of` != 1 is not supported when streaming tokens")


def test_openai_logprobs_n_echo_and_logit_bias(service):
    from openai import OpenAI

    client = OpenAI(base_url=service.url + "/v1", api_key="x")
    chat = [{"role": "user", "content": "Name a colour."}]
    answer = client.chat.completions.create(
        model="tgi", messages=chat, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    for token in answer.choices[0].logprobs.content:
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token  # greedy
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
    several = client.chat.completions.create(model="tgi", messages=chat, max_tokens=5, n=3, seed=4)
    assert [c.index for c in several.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="tgi", messages=chat, max_tokens=5, n=3, seed=4)
    assert [c.message.content for c in again.choices] == [c.message.content for c in several.choices]
    assert len({c.message.content for c in several.choices}) > 1

    echoed = client.completions.create(
        model="tgi", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    logprobs = echoed.choices[0].logprobs
    assert echoed.choices[0].text.startswith(PROMPT) and "".join(logprobs.tokens) == echoed.choices[0].text
    assert logprobs.token_logprobs[0] is None and len(logprobs.top_logprobs[-1]) == 2
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]

    biased = client.completions.create(
        model="tgi", prompt=PROMPT, max_tokens=8, temperature=0, logit_bias={"260": 4.0}, logprobs=0
    )
    expected = hf_greedy(service, PROMPT, 8, sequence_bias={(260,): 4.0})
    _, tok = hf(service.model_dir)
    assert biased.choices[0].text == tok.decode(expected)
    assert expected != hf_greedy(service, PROMPT, 8)  # the bias changed the text: the test can tell
