"""End to end: tool calling on /v1/chat/completions (TGI's semantics) through the real service, with
the openai SDK and huggingface_hub; the tool grammar forces the call's shape even for a tiny model."""

from __future__ import annotations

import json

import jsonschema
import pytest
import requests

pytestmark = pytest.mark.e2e

PARAMETERS = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS},
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
MESSAGES = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def openai_client(service):
    from openai import OpenAI

    return OpenAI(base_url=service.url + "/v1", api_key="x")


def chat(service, **body) -> requests.Response:
    body = {"messages": MESSAGES, "max_tokens": 60, **body}
    return requests.post(service.url + "/v1/chat/completions", json=body, timeout=120)


def test_openai_tool_calls_streamed_and_not(service):
    client = openai_client(service)
    named = {"type": "function", "function": {"name": "get_weather"}}
    asked = dict(model="tgi", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice=named, max_tokens=60)
    reply = client.chat.completions.create(**asked, temperature=0)
    choice = reply.choices[0]
    (call,) = choice.message.tool_calls
    assert (choice.finish_reason, choice.message.content, call.id) == ("tool_calls", None, "0")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)

    chunks = list(client.chat.completions.create(**asked, temperature=0, stream=True))
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["get_weather"] + [None] * (len(calls) - 1)
    assert "".join(c.function.arguments for c in calls) == call.function.arguments


def test_auto_and_none(service):
    client = openai_client(service)
    asked = dict(model="tgi", messages=MESSAGES, tools=[WEATHER], max_tokens=30, temperature=0)
    auto = client.chat.completions.create(**asked).choices[0]  # a call, or no_tool's text
    if auto.message.tool_calls:
        assert auto.message.tool_calls[0].function.name == "get_weather"
    else:
        assert isinstance(auto.message.content, str) and not auto.message.content.startswith('{"function"')
    plain = client.chat.completions.create(**{**asked, "max_tokens": 8}, tool_choice="none").choices[0]
    assert plain.message.tool_calls is None and plain.message.content
    assert plain.finish_reason in ("stop", "length")


def test_huggingface_hub_chat_completion_with_tools(service, hub_online):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=service.url)
    out = client.chat_completion(MESSAGES, tools=[WEATHER, TIME], tool_choice="required", max_tokens=60)
    call = out.choices[0].message.tool_calls[0]
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_tool_errors_are_tgis_422s(service):
    answer = chat(service, tools=[WEATHER], tool_choice="nope")
    assert answer.status_code == 422
    assert answer.json() == {"error": "Tool error: Tool with name nope not found", "error_type": "tool_error"}
    answer = chat(service, tools=[WEATHER], response_format={"type": "json_object"})
    assert answer.status_code == 422
    assert answer.json() == {
        "error": "Tool error: Grammar and tools are mutually exclusive",
        "error_type": "tool_error",
    }


def test_a_tool_reply_goes_through_the_template(service):
    call = {
        "id": "0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
    }
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "0", "content": "Sunny, 24 degrees celsius."},
    ]
    answer = chat(service, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert answer.status_code == 200, answer.text
    message = answer.json()["choices"][0]["message"]
    assert isinstance(message["content"], str) and message["content"] and "tool_calls" not in message
    tokenized = answer.json()["usage"]["prompt_tokens"]
    assert tokenized > 30  # the whole conversation went into the prompt
