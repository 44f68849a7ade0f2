"""End to end with the client libraries TGI users have: openai, huggingface_hub, text-generation, curl."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

from tgi_zmq import native

pytestmark = pytest.mark.e2e

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_openai_chat_stream_and_not(service):
    from openai import OpenAI

    client = OpenAI(base_url=service.url + "/v1", api_key="-")
    whole = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=20, temperature=0)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 10
    chunks = list(
        client.chat.completions.create(
            model="tgi",
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({(c.id, c.created) for c in chunks}) == 1  # one per stream, as OpenAI's


def test_openai_completions_ignore_eos(service):
    from openai import OpenAI

    client = OpenAI(base_url=service.url + "/v1", api_key="-")
    result = client.completions.create(
        model="tgi", prompt="Hello", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.usage.completion_tokens == 16
    assert result.choices[0].finish_reason == "length"
    stream = client.completions.create(
        model="tgi",
        prompt="Hello",
        max_tokens=16,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == result.choices[0].text
    assert [m.id for m in client.models.list().data]


def test_huggingface_hub_client(service, hub_online):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=service.url)
    text = client.text_generation("The capital of France is", max_new_tokens=12)
    assert isinstance(text, str) and text
    detailed = client.text_generation("The capital of France is", max_new_tokens=12, details=True)
    assert detailed.details.generated_tokens == len(detailed.details.tokens)
    streamed = "".join(client.text_generation("The capital of France is", max_new_tokens=12, stream=True))
    # POST / returns the full text by default (TGI), the stream only the new tokens.
    assert "The capital of France is" + streamed == detailed.generated_text
    chat = InferenceClient(base_url=service.url + "/v1/")
    out = chat.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=20, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in out)


def test_text_generation_client(service):
    from text_generation import Client

    client = Client(service.url, timeout=60)
    response = client.generate("The capital of France is", max_new_tokens=12)
    assert response.details.generated_tokens > 0
    tokens = [r.token.text for r in client.generate_stream("The capital of France is", max_new_tokens=12)]
    assert "".join(tokens) == response.generated_text


def test_curl_chat_stream_from_readme(service):
    body = {"model": "tgi", "messages": MESSAGES, "stream": True, "max_tokens": 20}
    out = subprocess.run(
        [
            "curl",
            "-sN",
            service.url + "/v1/chat/completions",
            "-X",
            "POST",
            "-d",
            json.dumps(body),
            "-H",
            "Content-Type: application/json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["object"] == "chat.completion.chunk"


def test_info_models_health_tokenize(service):
    info = requests.get(service.url + "/info", timeout=5).json()
    assert info["max_total_tokens"] == 2048 and info["max_input_tokens"] == 2047
    assert info["kernels"] == native.describe()  # as this process loads it: "native avx512" here
    for process in ("launcher", "worker-0"):  # the launch log and the worker that runs them say the same
        assert f"INFO {process} kernels: {info['kernels']}" in service.log()
    assert requests.get(service.url + "/health", timeout=5).status_code == 200
    models = requests.get(service.url + "/v1/models", timeout=5).json()
    assert models["object"] == "list" and {card["object"] for card in models["data"]} == {"model"}
    named = [(card["id"], card["owned_by"]) for card in models["data"]]
    assert named == [(info["model_id"], "tgi-zmq"), ("tgi", "tgi-zmq")]  # TGI's examples' name too
    assert requests.get(service.url + "/version", timeout=5).status_code == 404  # SMG: "then it is vLLM"
    rows = requests.post(service.url + "/tokenize", json={"inputs": "Hello world"}, timeout=5).json()
    assert "".join(r["text"] for r in rows) == "Hello world"
    assert all({"id", "text", "start", "stop"} <= set(r) for r in rows)
