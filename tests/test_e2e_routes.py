"""End to end: /chat_tokenize, SageMaker's /invocations, OpenAI's /v1/responses (function tools too), the
API's document."""

from __future__ import annotations

import json

import jsonschema
import pytest
import requests

from tests.test_e2e_tools import PARAMETERS

pytestmark = pytest.mark.e2e

INSTRUCTIONS = "You are a helpful assistant."
QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]


def post(service, path: str, body) -> requests.Response:
    return requests.post(service.url + path, json=body, timeout=120)


def sse(response: requests.Response) -> list[tuple[str | None, object]]:
    """``(event name, data)`` of each event of a Server-Sent Events body."""
    events = []
    for block in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "data" in lines:
            data = lines["data"]
            events.append((lines.get("event"), data if data == "[DONE]" else json.loads(data)))
    return events


def test_chat_tokenize_gives_the_templated_prompt_and_its_tokens(service):
    answer = post(service, "/chat_tokenize", {"model": "tgi", "messages": MESSAGES})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    text, tokens = body["templated_text"], body["tokenize_response"]
    assert QUESTION in text and INSTRUCTIONS in text
    assert all(text[t["start"] : t["stop"]] == t["text"] for t in tokens)
    assert "".join(t["text"] for t in tokens) == text
    chat = post(service, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}).json()
    assert len(tokens) == chat["usage"]["prompt_tokens"]


def test_chat_tokenize_renders_the_tools_in_effect(service):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    body = {"messages": MESSAGES, "tools": [tool], "tool_prompt": "Use a tool."}
    text = post(service, "/chat_tokenize", body).json()["templated_text"]
    assert "get_weather" in text and "Use a tool." in text
    unused = post(service, "/chat_tokenize", {**body, "tool_choice": "none"}).json()["templated_text"]
    assert "get_weather" not in unused
    assert unused == post(service, "/chat_tokenize", {"messages": MESSAGES}).json()["templated_text"]


def test_chat_tokenize_refuses_what_chat_refuses(service):
    answer = post(service, "/chat_tokenize", {"messages": []})
    assert answer.status_code == 422 and answer.json()["error_type"] == "validation"


def test_invocations_dispatch_on_the_body(service):
    prompt = "The capital of France is"
    generated = post(service, "/invocations", {"inputs": prompt, "parameters": {"max_new_tokens": 4}})
    assert generated.status_code == 200, generated.text
    (first,) = generated.json()  # POST /'s one-element array, with the prompt (return_full_text)
    assert first["generated_text"].startswith(prompt)
    assert first["generated_text"] == prompt + post(service, "/generate", {
        "inputs": prompt, "parameters": {"max_new_tokens": 4}
    }).json()["generated_text"]  # fmt: skip
    chat = post(service, "/invocations", {"messages": MESSAGES, "max_tokens": 4, "temperature": 0})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion", chat.text
    completion = post(service, "/invocations", {"prompt": prompt, "max_tokens": 4})
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion", completion.text
    streamed = post(
        service, "/invocations", {"inputs": prompt, "parameters": {"max_new_tokens": 4}, "stream": True}
    )
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    assert sse(streamed)[-1][1]["generated_text"] == first["generated_text"]


def test_invocations_refuse_a_body_of_no_known_shape(service):
    answer = post(service, "/invocations", {"input": "hi"})
    assert answer.status_code == 422
    assert "`inputs`, `messages` or `prompt`" in answer.json()["error"]


def test_responses_with_the_openai_sdk(service):
    from openai import OpenAI

    client = OpenAI(base_url=service.url + "/v1", api_key="-")
    chat = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=8, temperature=0)
    response = client.responses.create(
        model="tgi", instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=8, temperature=0
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"

    events = list(
        client.responses.create(
            model="tgi",
            input=[{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}],
            max_output_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{response.status}",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == events[-1].response.output_text == response.output_text


def test_responses_stream_names_its_events_and_stops_at_max_output_tokens(service):
    body = {
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
        "max_output_tokens": 2,
        "stream": True,
        "extra": "ignored",
    }
    answer = post(service, "/v1/responses", body)
    assert answer.status_code == 200, answer.text
    events = sse(answer)
    assert all(name == data["type"] for name, data in events)
    final = events[-1][1]["response"]
    assert events[-1][0] == "response.incomplete"
    assert (
        final["incomplete_details"] == {"reason": "max_output_tokens"}
        and final["usage"]["output_tokens"] == 2
    )


WEATHER_PARAMETERS = PARAMETERS  # chat's weather tool, flat as the Responses API writes tools
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": WEATHER_PARAMETERS,
}
WEATHER_QUESTION = "What is the weather like in Paris today?"


def test_responses_function_call_with_the_openai_sdk(service):
    from openai import OpenAI

    client = OpenAI(base_url=service.url + "/v1", api_key="-")
    asked = dict(
        model="tgi",
        input=WEATHER_QUESTION,
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,
    )
    response = client.responses.create(**asked)
    (call,) = response.output
    assert (call.type, call.name, call.status, response.status) == (
        "function_call",
        "get_weather",
        "completed",
        "completed",
    )
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    assert response.tool_choice == "required" and response.tools[0].name == "get_weather"

    events = list(client.responses.create(**asked, stream=True))
    assert [e.type for e in events[:3]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ]
    assert [e.type for e in events[-3:]] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert (events[2].item.type, events[2].item.arguments) == ("function_call", "")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    streamed = events[-1].response.output[0]
    assert deltas == events[-3].arguments == streamed.arguments == call.arguments
    assert streamed.name == "get_weather"


def test_responses_take_a_call_and_its_output_back(service):
    from openai import OpenAI

    client = OpenAI(base_url=service.url + "/v1", api_key="-")
    call = {
        "type": "function_call",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"location": "Paris"}',
    }
    response = client.responses.create(
        model="tgi",
        input=[
            {"role": "user", "content": WEATHER_QUESTION},
            call,
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 degrees celsius"},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=20,
        temperature=0,
    )
    (message,) = response.output
    assert message.type == "message" and response.output_text


def test_responses_tool_errors_are_tgis_422s(service):
    body = {"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}
    answer = post(service, "/v1/responses", body)
    assert answer.status_code == 422
    assert answer.json() == {"error": "Tool error: Tool with name nope not found", "error_type": "tool_error"}


def test_the_api_document_and_its_page(service):
    document = requests.get(service.url + "/api-doc/openapi.json", timeout=10).json()
    assert {"/chat_tokenize", "/invocations", "/v1/responses"} <= set(document["paths"])
    page = requests.get(service.url + "/docs", timeout=10)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
