"""The frontend's guards without the pipeline: API key, body timeout, draining."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tgi_zmq.config import ServerConfig
from tgi_zmq.frontend import create_app
from tgi_zmq.frontend.app import FRONTEND, drain
from tgi_zmq.frontend.auth import authorized

KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
UNAUTHORIZED = {"error": "Unauthorized", "error_type": "unauthorized"}
WORK_ROUTES = ["/generate", "/generate_stream", "/", "/v1/chat/completions", "/v1/completions", "/tokenize"]
SHUTTING_DOWN = {"error": "the server is shutting down", "error_type": "unavailable"}


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (f"Bearer {KEY}", True),
        (f"bearer {KEY}", True),
        (f"BEARER   {KEY} ", True),
        (None, False),
        ("", False),
        (KEY, False),
        (f"Basic {KEY}", False),
        ("Bearer secret-keyX", False),
        ("Bearer secret-", False),
        ("Bearer SECRET-KEY", False),  # only the scheme is case-insensitive
        ("Bearer s\udcffcret-key", False),  # undecodable bytes (surrogate-escaped) do not crash
    ],
)
def test_authorized(header: str | None, ok: bool) -> None:
    assert authorized(header, KEY) is ok


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="tgizmq-g") as path:  # short: ipc paths are limited
        yield path


@pytest.fixture
async def client(runtime_dir: str) -> AsyncIterator[TestClient]:
    config = ServerConfig(
        model_id="none",
        served_model_name="m",
        runtime_dir=runtime_dir,
        api_key=KEY,
        body_timeout=0.5,
        shutdown_timeout=0.3,
    )
    async with TestClient(TestServer(create_app(config))) as client:
        yield client


async def _slow_body(first: bytes, pause: float) -> AsyncIterator[bytes]:
    yield first
    await asyncio.sleep(pause)
    yield b"}"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}])
async def test_routes_need_the_key(client: TestClient, headers: dict[str, str]) -> None:
    for method, path in [("POST", "/generate"), ("POST", "/"), ("GET", "/info"), ("GET", "/v1/models")]:
        response = await client.request(method, path, json={"inputs": "hi"}, headers=headers)
        assert response.status == 401, path
        assert await response.json() == UNAUTHORIZED
    for path in ["/health", "/ping", "/", "/metrics"]:  # health is 503 here: no pipeline runs
        assert (await client.get(path, headers=headers)).status != 401, path
    assert (await client.get("/info", headers=AUTH)).status == 200


async def test_401_comes_before_the_body_is_read(client: TestClient) -> None:
    start = time.monotonic()
    response = await client.post("/generate", data=_slow_body(b'{"inputs": "hi"', 5.0))
    assert response.status == 401
    assert time.monotonic() - start < 2


async def test_a_slow_body_gets_408_and_the_connection_closes(client: TestClient) -> None:
    start = time.monotonic()
    response = await client.post("/generate", data=_slow_body(b'{"inputs": "hi"', 5.0), headers=AUTH)
    assert response.status == 408
    assert await response.json() == {
        "error": "Request body not received within 0.5 s",
        "error_type": "request_timeout",
    }
    assert response.headers["Connection"] == "close"
    assert 0.4 < time.monotonic() - start < 2


async def test_draining_refuses_new_work_but_keeps_answering(client: TestClient) -> None:
    client.app[FRONTEND].draining = True
    for path in WORK_ROUTES:
        response = await client.post(path, json={"inputs": "hi"}, headers=AUTH)
        assert response.status == 503, path
        assert await response.json() == SHUTTING_DOWN
    assert (await client.get("/health")).status == 503
    assert (await client.get("/info", headers=AUTH)).status == 200


async def test_drain_waits_for_the_requests_in_flight(client: TestClient) -> None:
    fe = client.app[FRONTEND]
    fe.admission.in_flight = 1
    asyncio.get_running_loop().call_later(0.1, setattr, fe.admission, "in_flight", 0)
    start = time.monotonic()
    await drain(fe)
    assert fe.draining and 0.05 < time.monotonic() - start < 0.25


async def test_drain_gives_up_after_the_shutdown_timeout(client: TestClient) -> None:
    fe = client.app[FRONTEND]
    fe.admission.in_flight = 1  # never finishes
    start = time.monotonic()
    await drain(fe)
    assert 0.3 <= time.monotonic() - start < 0.6
    fe.admission.in_flight = 0
