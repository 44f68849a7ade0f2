"""The request models, the body check they drive, and the OpenAPI document built from them (no pipeline)."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from tgi_zmq.errors import ValidationError
from tgi_zmq.frontend.request_models import (
    ChatRequest,
    CompletionRequest,
    GenerateBody,
    InvocationsRequest,
    ResponsesRequest,
    check_body,
)

AUTH = {"Authorization": "Bearer k"}
PROFILING = {"/start_profile", "/stop_profile"}


@pytest.fixture
async def client(frontend_client) -> TestClient:
    return await frontend_client(api_key="k")


async def test_the_document_is_valid_openapi_and_open(client: TestClient) -> None:
    response = await client.get("/api-doc/openapi.json")  # no key: open, like TGI's
    assert response.status == 200
    document = await response.json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert "ErrorResponse" in document["components"]["schemas"]


async def test_every_post_route_is_documented_with_its_body(client: TestClient) -> None:
    paths = (await (await client.get("/api-doc/openapi.json")).json())["paths"]
    posts = {r.resource.canonical for r in client.app.router.routes() if r.method == "POST"}
    assert posts >= {"/", "/generate", "/chat_tokenize", "/invocations", "/v1/responses"}
    for path in posts - PROFILING:  # no body (tests/test_profiling.py)
        operation = paths[path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"], path
        assert {"200", "422", "424", "429", "503"} <= set(operation["responses"]), path
    streamed = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(streamed) == {"application/json", "text/event-stream"}
    assert set(paths["/generate_stream"]["post"]["responses"]["200"]["content"]) == {"text/event-stream"}


async def test_the_docs_page_loads_swagger_ui_over_the_document(client: TestClient) -> None:
    response = await client.get("/docs")
    assert response.status == 200 and response.content_type == "text/html"
    page = await response.text()
    assert "swagger-ui-bundle.js" in page and '"api-doc/openapi.json"' in page


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/generate", {"parameters": {}}, "inputs: Field required"),
        ("/generate", {"inputs": "x", "parameters": {"temperature": "hot"}}, "parameters.temperature: "),
        (
            "/generate",
            {"inputs": "x", "parameters": {"stop": "a"}},
            "parameters.stop: Input should be a valid list",
        ),
        ("/v1/chat/completions", {"messages": "hi"}, "messages: Input should be a valid list"),
        ("/chat_tokenize", {"messages": [{"content": "hi"}]}, "messages[0].role: Field required"),
        ("/v1/completions", {"prompt": ["a", 1]}, "prompt[1]: Input should be a valid string"),
        ("/invocations", {"input": "hi"}, "the body must have `inputs`, `messages` or `prompt`"),
        ("/invocations", {"inputs": 1}, "inputs: Input should be a valid string"),
        ("/v1/responses", {"input": [{"role": "robot", "content": "hi"}]}, "input[0].role: Input should be"),
        (
            "/v1/responses",
            {"input": "hi", "tools": [{"type": "web_search"}]},
            "tools[0].type: Input should be",
        ),
        ("/v1/responses", {"input": [{"type": "reasoning"}]}, "input[0]: an input item must be a message,"),
        ("/v1/responses", {"input": "hi", "tool_choice": {"type": "function"}}, "tool_choice.name: Field"),
    ],
)
async def test_a_body_of_the_wrong_type_is_a_422_before_the_handler(
    client: TestClient, path: str, body: dict, error: str
) -> None:
    response = await client.post(path, json=body, headers=AUTH)
    assert response.status == 422
    answer = await response.json()
    assert answer["error_type"] == "validation"
    assert answer["error"].startswith("Input validation error: " + error), answer["error"]


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (GenerateBody, {"inputs": "x", "parameters": None, "unknown": {"any": 1}}),
        (
            GenerateBody,
            {"inputs": "x", "parameters": {"temperature": 1, "seed": 2**64 - 1, "grammar": None}},
        ),
        (
            ChatRequest,
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}
                ]
            },
        ),
        (
            ChatRequest,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "stop": "x"},
        ),
        (
            ChatRequest,
            {"messages": [], "logit_bias": {"12": -100}, "response_format": {"type": "json_object"}},
        ),
        (CompletionRequest, {"prompt": ["a", "b"], "logprobs": 2, "stream": None}),
        (InvocationsRequest, {"messages": [{"role": "user", "content": "hi"}], "prompt": 1}),  # chat wins
        (ResponsesRequest, {"input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}]}]}),
        (
            ResponsesRequest,
            {
                "input": [
                    {"type": "message", "role": "user", "content": "a"},
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "id": "fc_1"},
                    {"type": "function_call_output", "call_id": "c", "output": "sunny"},
                ],
                "tools": [
                    {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}
                ],
                "tool_choice": {"type": "function", "name": "f"},
            },
        ),
    ],
)
def test_bodies_the_handlers_take_pass_the_check(model: type, body: dict) -> None:
    check_body(model, body)  # value rules (ranges, empty lists) are the handlers' own


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"inputs": "x", "parameters": {"max_new_tokens": 1.5}}, "parameters.max_new_tokens: "),
        (
            {"inputs": "x", "parameters": {"do_sample": 1}},
            "parameters.do_sample: Input should be a valid boolean",
        ),
        ({"inputs": "x", "parameters": {"top_k": True}}, "parameters.top_k: Input should be a valid integer"),
        (
            {"inputs": "x", "parameters": {"grammar": {"type": "xml", "value": 1}}},
            "parameters.grammar.type: ",
        ),
    ],
)
def test_json_types_are_strict(body: dict, error: str) -> None:
    with pytest.raises(ValidationError) as caught:
        check_body(GenerateBody, body)
    assert str(caught.value).startswith(error)


# ---------------------------------------------------------------------------- /v1/responses objects


def _stream(body: dict, pieces: list[str], finish: str = "eos_token", *, tools: bool = False) -> list:
    """Every event of a streamed response of one delta per piece, the last one finished with ``finish``."""
    from tgi_zmq.frontend.jobs import Job
    from tgi_zmq.frontend.responses_routes import _Events, _Shape
    from tgi_zmq.messages import GenerateRequest as Wire
    from tgi_zmq.messages import RequestDelta, SamplingParams

    shape = _Shape.of(body, "abc", "m", tools=tools)
    job = Job(Wire("abc", None, [], SamplingParams(), len(pieces), 0.0), box=None)
    events, out = _Events(shape), []
    for i, text in enumerate(pieces, 1):
        last = i == len(pieces)
        delta = RequestDelta("abc", [1], [text], [-0.5], [False], text, finish if last else None, i, 5)
        job.absorb(delta)
        out += events.render(job, delta)
    return out


def _parsed(events: list) -> list:
    """``events`` as the openai SDK reads them, checked for names and numbering."""
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    parsed = [TypeAdapter(ResponseStreamEvent).validate_python(e.data) for e in events]
    assert [e.name for e in events] == [p.type for p in parsed]
    assert [p.sequence_number for p in parsed] == list(range(len(parsed)))
    return parsed


def _events_of(status: str) -> list:
    """Every event of a streamed response of two deltas, finished with ``status``."""
    finish = "length" if status == "incomplete" else "eos_token"
    return _stream({"input": "hi", "max_output_tokens": 2}, ["Hel", "lo"], finish)


@pytest.mark.parametrize("status", ["completed", "incomplete"])
def test_responses_events_parse_as_the_openai_sdk_types(status: str) -> None:
    parsed = _parsed(_events_of(status))
    final = parsed[-1].response
    assert parsed[-1].type == f"response.{status}" and final.status == status
    assert final.output_text == "Hello" and final.usage.total_tokens == 7
    assert (final.incomplete_details is not None) == (status == "incomplete")


def test_a_failed_response_stream_ends_with_error_and_response_failed() -> None:
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    from tgi_zmq.errors import RequestError
    from tgi_zmq.frontend.responses_routes import _Events, _Shape

    events = _Events(_Shape.of({"input": "hi"}, "abc", "m"))
    failed = events.failed(RequestError("boom", error_type="generation", status=424))
    parsed = [TypeAdapter(ResponseStreamEvent).validate_python(e.data) for e in failed]
    assert [p.type for p in parsed] == ["error", "response.failed"]
    assert parsed[1].response.error.message == "boom"


WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
CALL = '{"function": {"_name": "get_weather", "city": "Paris", "days": [1, 2]}}'


def test_a_function_call_streams_its_arguments_as_the_sdk_reads_them() -> None:
    body = {"input": "hi", "tools": [WEATHER], "tool_choice": "required"}
    pieces = [CALL[i : i + 7] for i in range(0, len(CALL), 7)]
    parsed = _parsed(_stream(body, pieces, tools=True))
    assert [p.type for p in parsed[:3]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ]
    assert [p.type for p in parsed[-3:]] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added, done, final = parsed[2].item, parsed[-2].item, parsed[-1].response
    assert (added.type, added.name, added.arguments, added.status) == (
        "function_call",
        "get_weather",
        "",
        "in_progress",
    )
    deltas = [p for p in parsed if p.type == "response.function_call_arguments.delta"]
    assert {(p.item_id, p.output_index) for p in deltas} == {(added.id, 0)}
    arguments = "".join(p.delta for p in deltas)
    assert arguments == parsed[-3].arguments == done.arguments == final.output[0].arguments
    assert json.loads(arguments) == {"city": "Paris", "days": [1, 2]}
    assert (done.id, done.call_id, done.status) == ("fc_abc", "call_abc", "completed")
    assert final.tool_choice == "required" and final.tools[0].name == "get_weather"
    assert final.output_text == ""


def test_no_tool_streams_as_text() -> None:
    text = '{"function": {"_name": "no_tool", "content": "Hi there"}}'
    parsed = _parsed(
        _stream({"input": "hi", "tools": [WEATHER]}, [text[:20], text[20:40], text[40:]], tools=True)
    )
    assert "response.content_part.added" in [p.type for p in parsed]
    deltas = "".join(p.delta for p in parsed if p.type == "response.output_text.delta")
    assert deltas == "Hi there" == parsed[-1].response.output_text
    assert parsed[-1].response.tool_choice == "auto"


def test_a_response_with_a_call_is_the_sdks_response() -> None:
    from openai.types.responses import Response, ResponseFunctionToolCall

    from tgi_zmq.frontend.jobs import Job
    from tgi_zmq.frontend.responses_routes import _Shape
    from tgi_zmq.messages import GenerateRequest as Wire
    from tgi_zmq.messages import RequestDelta, SamplingParams

    body = {"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}
    job = Job(Wire("abc", None, [], SamplingParams(), 9, 0.0), box=None)
    job.absorb(RequestDelta("abc", [1], [CALL], [-0.5], [False], CALL, "eos_token", 1, 5))
    response = Response.model_validate(_Shape.of(body, "abc", "m", tools=True).response("completed", job))
    (call,) = response.output
    assert isinstance(call, ResponseFunctionToolCall)
    assert (call.name, call.call_id, json.loads(call.arguments)) == (
        "get_weather",
        "call_abc",
        {"city": "Paris", "days": [1, 2]},
    )
    assert response.tool_choice.name == "get_weather"


def test_responses_tools_and_calls_become_chats() -> None:
    from tgi_zmq.frontend.responses_routes import _chat_body

    body = {
        "input": [
            {"type": "message", "role": "developer", "content": "Be brief."},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ],
        "tools": [{**WEATHER, "description": "The weather", "strict": True}],
        "tool_choice": {"type": "function", "name": "get_weather"},
    }
    chat = _chat_body(body)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    function = {"name": "get_weather", "description": "The weather", "parameters": {"type": "object"}}
    assert chat["tools"] == [{"type": "function", "function": function}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
