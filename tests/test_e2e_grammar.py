"""End to end: structured output through the real service (TGI's `grammar`, OpenAI's
`response_format`), streamed and not, greedy and sampled; a grammar the engine refuses is a 422."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests

pytestmark = pytest.mark.e2e

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


def generate(service, prompt: str, **parameters) -> requests.Response:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 60, **parameters}}
    return requests.post(service.url + "/generate", json=body, timeout=120)


def conforms(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"city", "population"} and isinstance(value["population"], int)


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 1.5, "seed": 3}])
def test_tgi_json_and_regex_grammars_hold(service, sampling):
    json_grammar = {"type": "json", "value": SCHEMA}
    answer = generate(service, "The biggest city of France:", grammar=json_grammar, **sampling)
    assert answer.status_code == 200, answer.text
    assert conforms(answer.json()["generated_text"])
    regex = {"type": "regex", "value": "(19|20)[0-9]{2}-[01][0-9]"}
    answer = generate(service, "A date:", grammar=regex, **sampling)
    assert re.fullmatch(regex["value"], answer.json()["generated_text"])


def test_streamed_tokens_follow_the_grammar(service):
    body = {
        "inputs": "Give me a number:",
        "parameters": {"max_new_tokens": 20, "grammar": {"type": "regex", "value": "[0-9]{4}"}},
    }
    with requests.post(service.url + "/generate_stream", json=body, stream=True, timeout=120) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:")]
    assert re.fullmatch("[0-9]{4}", events[-1]["generated_text"])
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == "".join(
        events[-1]["generated_text"]
    )


def test_openai_response_format_json_schema_and_json_object(service):
    from openai import OpenAI

    client = OpenAI(base_url=service.url + "/v1", api_key="-")
    messages = [{"role": "user", "content": "Name a big city and its population as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    reply = client.chat.completions.create(model="tgi", messages=messages, response_format=fmt, max_tokens=60)
    assert conforms(reply.choices[0].message.content)
    stream = client.chat.completions.create(
        model="tgi",
        messages=messages,
        response_format={"type": "json_object"},
        max_tokens=100,
        temperature=0,
        stream=True,
    )
    chunks = [chunk for chunk in stream if chunk.choices]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    if chunks[-1].choices[0].finish_reason == "length":  # any object may be longer than max_tokens
        assert text.startswith("{")
    else:
        assert isinstance(json.loads(text), dict)


def test_tgis_json_schema_form_in_grammar_and_response_format(service):
    """TGI's ``{"type": "json_schema", "value": {"name", "schema"}}`` (serde's tag + content)."""
    tgi_form = {"type": "json_schema", "value": {"name": "city", "schema": SCHEMA}}
    answer = generate(service, "The biggest city of France:", grammar=tgi_form)
    assert answer.status_code == 200, answer.text
    assert conforms(answer.json()["generated_text"])
    messages = [{"role": "user", "content": "Name a big city and its population as JSON."}]
    body = {"messages": messages, "response_format": tgi_form, "max_tokens": 60}
    reply = requests.post(service.url + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert conforms(reply.json()["choices"][0]["message"]["content"])


def test_unconstrained_requests_beside_a_grammar_keep_their_tokens(service):
    plain = generate(service, "Once upon a time", max_new_tokens=20).json()["generated_text"]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        constrained = pool.submit(generate, service, "Data:", grammar={"type": "json", "value": SCHEMA})
        together = pool.submit(generate, service, "Once upon a time", max_new_tokens=20)
        assert together.result().json()["generated_text"] == plain
        assert conforms(constrained.result().json()["generated_text"])


def test_a_grammar_the_engine_refuses_is_a_422_with_its_reason(service):
    answer = generate(service, "x", grammar={"type": "regex", "value": "a(b"})
    assert answer.status_code == 422
    body = answer.json()
    assert body["error_type"] == "validation" and "unclosed group" in body["error"]
    stream = {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a(b"}}}
    streamed = requests.post(service.url + "/generate_stream", json=stream, timeout=120)
    assert (
        streamed.status_code == 422 and streamed.json()["error_type"] == "validation"
    )  # not in a 200 stream
    assert generate(service, "x", grammar={"type": "regex", "value": "ab"}).json()["generated_text"] == "ab"


def test_a_grammar_that_compiles_too_long_is_a_422_and_the_service_carries_on(flagged_service):
    # over a second to compile (tests/test_grammar.py's SLOW): a 422 once the timeout (0.25 s) is past
    slow = {"properties": {f"p{i}": {"minimum": i, "maximum": i * 1000 + 7} for i in range(3000)}}
    svc = flagged_service
    quick = {"type": "regex", "value": "ab"}  # compiles in a millisecond
    assert generate(svc, "x", grammar=quick).json()["generated_text"] == "ab"  # the engine loads first
    for _ in range(2):  # the second: the cached refusal
        start = time.monotonic()
        answer = generate(svc, "x", grammar={"type": "json", "value": slow})
        assert answer.status_code == 422 and time.monotonic() - start < 5
        assert answer.json()["error"] == "Input validation error: grammar: compilation timed out after 0.25 s"
    assert generate(svc, "Once upon a time", max_new_tokens=5).status_code == 200
    assert generate(svc, "y", grammar=quick).json()["generated_text"] == "ab"


def test_huggingface_hub_grammar_and_response_format(service, hub_online):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=service.url)
    regex = "(19|20)[0-9]{2}-[01][0-9]"
    grammar = {"type": "regex", "value": regex}
    text = client.text_generation("A date:", max_new_tokens=20, grammar=grammar)
    assert text.startswith("A date:") and re.fullmatch(regex, text[7:])  # POST /: full text, as TGI's
    out = client.chat_completion(
        [{"role": "user", "content": "The biggest city of France, as JSON."}],
        max_tokens=60,
        response_format={"type": "json", "value": SCHEMA},
    )
    assert conforms(out.choices[0].message.content)
