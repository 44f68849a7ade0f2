"""The HTTP edges of the routes, through a real HTTP client over the app (no pipeline processes: a
stream's outputs are handed to the frontend's reader as the detokenizer would send them): bodies that
parse but are no text, content types, unknown routes and methods, one ``created`` per stream."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tgi_zmq.frontend import openai_routes
from tgi_zmq.frontend.http import FRONTEND
from tgi_zmq.messages import BatchTextOutput, GenerateRequest, RequestDelta

JSON = {"Content-Type": "application/json"}
LONE = "\\ud800"  # JSON's escape of a lone UTF-16 surrogate: valid JSON, but no text
NOT_TEXT = "is not valid Unicode text: it holds a lone surrogate"
USER = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "f", "description": LONE, "parameters": {}}}
GRAMMAR = {"grammar": {"type": "regex", "value": LONE}}
SCHEMA = {"type": "json", "value": {LONE: 1}}


@pytest.fixture
async def client(frontend_client) -> TestClient:
    return await frontend_client()


async def post_text(client: TestClient, path: str, text: str | bytes, headers: dict[str, str] = JSON) -> Any:
    response = await client.post(path, data=text, headers=headers)
    return response.status, await response.json()


def body(obj: dict[str, Any]) -> str:
    """``obj`` as JSON text, every ``LONE`` in it left as the escape itself."""
    return json.dumps(obj).replace("\\\\ud800", "\\ud800")


@pytest.mark.parametrize(
    ("path", "obj", "where"),
    [
        ("/generate", {"inputs": LONE}, "`inputs`"),
        ("/generate_stream", {"inputs": "hi", "parameters": {"stop": ["a", LONE]}}, "`parameters.stop[1]`"),
        ("/", {"inputs": "hi", "parameters": GRAMMAR}, "`parameters.grammar.value`"),
        ("/tokenize", {"inputs": f"a {LONE} b"}, "`inputs`"),
        ("/v1/chat/completions", {"messages": [USER, {**USER, "content": LONE}]}, "`messages[1].content`"),
        ("/v1/chat/completions", {"messages": [USER], "tools": [TOOL]}, "`tools[0].function.description`"),
        ("/v1/chat/completions", {"messages": [USER], LONE: 1}, "a key in the body"),
        ("/v1/completions", {"prompt": ["ok", LONE]}, "`prompt[1]`"),
        ("/v1/completions", {"prompt": "hi", "response_format": SCHEMA}, "a key in `response_format.value`"),
        ("/chat_tokenize", {"messages": [{"role": LONE, "content": "hi"}]}, "`messages[0].role`"),
        ("/invocations", {"inputs": LONE}, "`inputs`"),
        ("/v1/responses", {"input": LONE}, "`input`"),
    ],
)  # fmt: skip
async def test_a_string_that_is_no_text_is_a_422_on_every_route(
    client: TestClient, path: str, obj: dict, where: str
) -> None:
    status, answer = await post_text(client, path, body(obj))
    assert status == 422, answer
    assert answer["error_type"] == "validation"
    assert answer["error"].startswith(f"Input validation error: {where} {NOT_TEXT}"), answer["error"]
    assert not client.app[FRONTEND].pipeline._boxes  # nothing went down the pipeline


async def test_a_surrogate_sent_as_raw_bytes_is_a_422_too(client: TestClient) -> None:
    status, answer = await post_text(client, "/generate", b'{"inputs": "\xed\xa0\x80"}')  # CESU-8's U+D800
    assert (status, answer["error_type"]) == (422, "validation")


async def test_a_surrogate_pair_is_text(client: TestClient) -> None:
    status, answer = await post_text(client, "/generate", '{"inputs": "", "x": "\\ud83d\\ude00"}')
    assert (status, answer["error"]) == (422, "Input validation error: `inputs` cannot be empty")


async def test_a_body_nested_too_deep_is_a_400(client: TestClient) -> None:
    for depth in (200, 100_000):  # the latter is too deep for Python's own parser
        status, answer = await post_text(client, "/generate", '{"x": ' + "[" * depth + "]" * depth + "}")
        assert (status, answer["error_type"]) == (400, "bad_request"), answer
        assert "nested deeper than 128 levels" in answer["error"]


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonl"]
)
async def test_a_json_body_sent_as_something_else_is_a_415(
    client: TestClient, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/generate", "/v1/chat/completions", "/tokenize"):
        status, answer = await post_text(client, path, '{"inputs": "hi"}', headers)
        assert (status, answer) == (
            415,
            {
                "error": "Expected request with `Content-Type: application/json`",
                "error_type": "unsupported_media_type",
            },
        )


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.x+json"]
)
async def test_json_content_types_are_taken(client: TestClient, content_type: str) -> None:
    status, answer = await post_text(client, "/generate", '{"inputs": ""}', {"Content-Type": content_type})
    assert (status, answer["error"]) == (422, "Input validation error: `inputs` cannot be empty")


async def test_an_unknown_route_is_a_json_404(client: TestClient) -> None:
    for method in ("GET", "POST"):
        response = await client.request(method, "/v2/nothing", json={})
        assert response.status == 404
        assert await response.json() == {"error": "Not Found", "error_type": "not_found"}


async def test_a_wrong_method_is_a_json_405_with_allow(client: TestClient) -> None:
    for method, path, allowed in (("GET", "/generate", "POST"), ("DELETE", "/info", "GET")):
        response = await client.request(method, path)
        assert response.status == 405
        assert response.headers["Allow"] == allowed
        assert await response.json() == {"error": "Method Not Allowed", "error_type": "method_not_allowed"}


# ---------------------------------------------------------------------------- one `created` per stream


class Clock:
    """``time`` for openai_routes: ten seconds pass at each reading."""

    def __init__(self) -> None:
        self.seconds = itertools.count(1_700_000_000, 10)

    def time(self) -> float:
        return float(next(self.seconds))


async def stream(client: TestClient, path: str, obj: dict[str, Any], texts: list[str]) -> list[dict]:
    """The events of a streamed ``path`` whose one request generates ``texts`` (a delta each)."""
    pipeline = client.app[FRONTEND].pipeline
    answer = asyncio.create_task(client.post(path, json={**obj, "stream": True}))
    while not pipeline._boxes:
        await asyncio.sleep(0.01)
    (box,) = pipeline._boxes.values()
    assert isinstance(box.request, GenerateRequest)
    for n, text in enumerate(texts, 1):
        finish = "length" if n == len(texts) else None
        pipeline._dispatch(
            BatchTextOutput([RequestDelta(box.rid, [n], [text], [-0.5], [False], text, finish, n, 3)])
        )
        await asyncio.sleep(0.05)  # the handler renders each delta on its own
    response = await answer
    assert response.status == 200
    lines = (await response.text()).splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


@pytest.mark.parametrize(
    ("path", "obj"),
    [
        ("/v1/chat/completions", {"messages": [USER], "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}),
    ],
)
async def test_every_chunk_of_a_stream_has_the_same_created_and_id(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, path: str, obj: dict
) -> None:
    monkeypatch.setattr(openai_routes, "time", Clock())
    chunks = await stream(client, path, obj, ["Hel", "lo", " you"])
    assert len(chunks) == 4 and chunks[-1]["usage"]["completion_tokens"] == 3  # three deltas and the usage
    assert len({chunk["created"] for chunk in chunks}) == 1
    assert len({chunk["id"] for chunk in chunks}) == 1


def test_a_stream_with_a_grammar_waits_for_its_compile_before_sending_its_headers():
    """Rank 0 compiles a grammar first (up to --grammar-compile-timeout): its refusal must still find
    the headers unsent, to be a 422 rather than an error event in a 200 stream."""
    from types import SimpleNamespace

    from tests.conftest import frontend_config
    from tgi_zmq.frontend.streaming import HEADER_WAIT_S, header_wait
    from tgi_zmq.messages import Grammar, SamplingParams

    config = frontend_config("/nonexistent", grammar_compile_timeout=7.0)
    request = SimpleNamespace(app={FRONTEND: SimpleNamespace(config=config)})

    def group(*grammars: Grammar | None) -> SimpleNamespace:
        jobs = [SimpleNamespace(request=SimpleNamespace(params=SamplingParams(grammar=g))) for g in grammars]
        return SimpleNamespace(jobs=jobs)

    assert header_wait(request, group(None, None)) == HEADER_WAIT_S
    assert header_wait(request, group(None, Grammar("regex", "[0-9]+"))) == HEADER_WAIT_S + 7.0


# ---------------------------------------------------------------------------- keep-alive comments


@pytest.mark.parametrize(("keep_alive", "comments"), [(0.1, True), (0.0, False)])
async def test_a_silent_stream_gets_keep_alive_comments_unless_turned_off(
    frontend_client, keep_alive: float, comments: bool
) -> None:
    client = await frontend_client(sse_keep_alive=keep_alive)
    pipeline = client.app[FRONTEND].pipeline
    answer = asyncio.create_task(client.post("/generate_stream", json={"inputs": "hi"}))
    while not pipeline._boxes:
        await asyncio.sleep(0.01)
    (box,) = pipeline._boxes.values()
    for n, finish in [(1, None), (2, "length")]:
        text = "ab"[n - 1]
        delta = RequestDelta(box.rid, [n], [text], [-0.5], [False], text, finish, n, 3)
        pipeline._dispatch(BatchTextOutput([delta]))
        await asyncio.sleep(0.5)  # silent: five keep-alive periods
    response = await answer
    lines = [line for line in (await response.text()).splitlines() if line]
    assert [json.loads(line[5:])["token"]["text"] for line in lines if line.startswith("data:")] == ["a", "b"]
    assert (":" in lines) == comments, lines
