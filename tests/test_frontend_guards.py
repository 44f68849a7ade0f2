"""The frontend's guards without the pipeline: API key, body timeout, draining.

Timings are checked for what they show (a refusal that did not wait for the body, a drain that waited
for its request or gave up at its timeout) with bounds that a loaded two-core machine keeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import frontend_config
from tgi_zmq.frontend.app import drain
from tgi_zmq.frontend.auth import authorized
from tgi_zmq.frontend.http import FRONTEND, Frontend

KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
UNAUTHORIZED = {"error": "Unauthorized", "error_type": "unauthorized"}
WORK_ROUTES = ["/generate", "/generate_stream", "/", "/v1/chat/completions", "/v1/completions", "/tokenize"]
SHUTTING_DOWN = {"error": "the server is shutting down", "error_type": "unavailable"}
JSON = {"Content-Type": "application/json"}
BODY_TIMEOUT = 0.5
BODY_PAUSE = 10.0  # the rest of a slow body comes this late, if at all


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
async def client(frontend_client) -> TestClient:
    return await frontend_client(api_key=KEY, body_timeout=BODY_TIMEOUT)


async def _slow_body(first: bytes) -> AsyncIterator[bytes]:
    yield first
    await asyncio.sleep(BODY_PAUSE)
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
    response = await client.post("/generate", data=_slow_body(b'{"inputs": "hi"'), headers=JSON)
    assert response.status == 401
    assert time.monotonic() - start < BODY_PAUSE / 2  # did not wait for the rest of the body


async def test_a_slow_body_gets_408_and_the_connection_closes(client: TestClient) -> None:
    start = time.monotonic()
    response = await client.post("/generate", data=_slow_body(b'{"inputs": "hi"'), headers={**AUTH, **JSON})
    assert response.status == 408
    assert await response.json() == {
        "error": f"Request body not received within {BODY_TIMEOUT} s",
        "error_type": "request_timeout",
    }
    assert response.headers["Connection"] == "close"
    assert BODY_TIMEOUT <= time.monotonic() - start < BODY_PAUSE / 2  # at the timeout, not the body's end


async def test_draining_refuses_new_work_but_keeps_answering(client: TestClient) -> None:
    client.app[FRONTEND].draining = True
    for path in WORK_ROUTES:
        response = await client.post(path, json={"inputs": "hi"}, headers=AUTH)
        assert response.status == 503, path
        assert await response.json() == SHUTTING_DOWN
    assert (await client.get("/health")).status == 503
    assert (await client.get("/info", headers=AUTH)).status == 200


async def test_drain_waits_for_the_requests_in_flight(runtime_dir: str) -> None:
    fe = Frontend.create(frontend_config(runtime_dir, shutdown_timeout=60))
    fe.admission.in_flight = 1
    asyncio.get_running_loop().call_later(0.2, setattr, fe.admission, "in_flight", 0)
    start = time.monotonic()
    await drain(fe)
    assert fe.draining and fe.admission.in_flight == 0
    assert 0.1 < time.monotonic() - start < 30  # until the request ended, not until the timeout


async def test_drain_gives_up_after_the_shutdown_timeout(runtime_dir: str) -> None:
    fe = Frontend.create(frontend_config(runtime_dir, shutdown_timeout=0.3))
    fe.admission.in_flight = 1  # never finishes
    start = time.monotonic()
    await drain(fe)
    assert fe.admission.in_flight == 1
    assert 0.3 <= time.monotonic() - start < 10  # the timeout, then it returns
