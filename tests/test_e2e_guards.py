"""End to end: --api-key, --body-timeout and the graceful stop on SIGTERM (drain, then exit)."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest
import requests
from openai import OpenAI

from tests.conftest import Service, children, start_service, stop_service

pytestmark = pytest.mark.e2e

KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_TIMEOUT = 2
SHUTDOWN_TIMEOUT = 60  # far longer than the drained stream lasts, even on a loaded machine
UNAUTHORIZED = {"error": "Unauthorized", "error_type": "unauthorized"}
PROMPT = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 3}}
CHAT = {"model": "tgi", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 3}
GUARDED = [
    ("POST", "/", PROMPT),
    ("POST", "/generate", PROMPT),
    ("POST", "/generate_stream", PROMPT),
    ("POST", "/tokenize", PROMPT),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "tgi", "prompt": "Hi", "max_tokens": 3}),
    ("GET", "/info", None),
    ("GET", "/v1/models", None),
    ("GET", "/v1/loads", None),
]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Service:
    svc = start_service(
        tmp_path_factory.mktemp("guarded"),
        "--dtype",
        "float32",
        "--max-batch-total-tokens",
        "4096",
        "--api-key",
        KEY,
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--shutdown-timeout",
        str(SHUTDOWN_TIMEOUT),
        "--disable-grammar-support",
    )
    yield svc
    if svc.process.poll() is None:  # the last test stops it itself
        stop_service(svc, wait=False)


# ---------------------------------------------------------------------------- --api-key


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}],
    ids=["none", "wrong", "no-scheme"],
)
def test_routes_refuse_a_missing_or_wrong_key(guarded: Service, headers: dict[str, str]) -> None:
    for method, path, body in GUARDED:
        response = requests.request(method, guarded.url + path, json=body, headers=headers, timeout=10)
        assert response.status_code == 401, path
        assert response.json() == UNAUTHORIZED, path


def test_the_key_opens_them(guarded: Service) -> None:
    response = requests.post(guarded.url + "/generate", json=PROMPT, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    text = response.json()["generated_text"]
    assert isinstance(text, str) and text


def test_grammars_are_refused_when_disabled(guarded: Service) -> None:
    body = {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "ab"}}}
    response = requests.post(guarded.url + "/generate", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 422
    assert response.json() == {
        "error": "Input validation error: grammar is not supported",
        "error_type": "validation",
    }
    lower_scheme = {"Authorization": f"bearer {KEY}"}
    assert requests.get(guarded.url + "/info", headers=lower_scheme, timeout=10).status_code == 200


def test_the_openai_sdk_sends_its_api_key(guarded: Service) -> None:
    client = OpenAI(base_url=guarded.url + "/v1", api_key=KEY)
    completion = client.chat.completions.create(**CHAT)
    assert completion.choices[0].message.content is not None
    assert completion.usage.completion_tokens >= 1
    wrong = OpenAI(base_url=guarded.url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(**CHAT)


def test_health_and_metrics_need_no_key(guarded: Service) -> None:
    for path in ["/health", "/ping", "/", "/metrics"]:
        assert requests.get(guarded.url + path, timeout=10).status_code == 200, path


# ---------------------------------------------------------------------------- --body-timeout


def _read_response(sock: socket.socket) -> tuple[str, bytes]:
    """The head and the body of one HTTP response (the body sized by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = int(next(value for name, value in headers.items() if name.lower() == b"content-length"))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "connection closed mid-body"
        body += chunk
    return head.decode(), body


def test_a_body_that_stops_arriving_gets_408(guarded: Service) -> None:
    url = urlparse(guarded.url)
    head = (
        "POST /generate HTTP/1.1\r\n"
        f"Host: {url.netloc}\r\n"
        f"Authorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: 200\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=BODY_TIMEOUT + 30) as sock:
        start = time.monotonic()
        sock.sendall(head.encode() + b'{"inputs":')  # 10 of the 200 bytes, then nothing
        status, body = _read_response(sock)
        elapsed = time.monotonic() - start
    assert status.startswith("HTTP/1.1 408"), status
    assert "connection: close" in status.lower()
    assert json.loads(body) == {
        "error": f"Request body not received within {BODY_TIMEOUT} s",
        "error_type": "request_timeout",
    }
    assert elapsed > BODY_TIMEOUT - 0.5  # it waited for the body until --body-timeout (no upper bound)
    assert requests.get(guarded.url + "/health", timeout=10).status_code == 200
    assert requests.post(guarded.url + "/generate", json=PROMPT, headers=AUTH, timeout=60).status_code == 200


# -------------------------------------------------------------------- SIGTERM (last: stops the service)


def _tokens_lasting(service: Service, seconds: float) -> int:
    """How many tokens a stream needs to last ``seconds`` here (at least 60): it must outlast the
    second supervisord takes to pass SIGTERM on, also on a fast machine."""
    start = time.monotonic()
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 20, "ignore_eos": True}}
    assert requests.post(service.url + "/generate", json=body, headers=AUTH, timeout=60).status_code == 200
    per_token = (time.monotonic() - start) / 20
    return min(max(60, math.ceil(seconds / per_token)), 1000)


def test_sigterm_drains_the_requests_in_flight_then_stops(guarded: Service) -> None:
    n = _tokens_lasting(guarded, 4.0)
    events: list[dict] = []
    started = threading.Event()
    failures: list[BaseException] = []

    def stream() -> None:
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": n, "ignore_eos": True}}
        try:
            with requests.post(
                guarded.url + "/generate_stream", json=body, headers=AUTH, stream=True, timeout=60
            ) as response:
                assert response.status_code == 200, response.text
                for line in response.iter_lines():
                    if line.startswith(b"data:"):
                        events.append(json.loads(line[5:]))
                        started.set()
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)
        finally:
            started.set()

    runtime_dir = Path(re.search(r"runtime dir (\S+);", guarded.log()).group(1))
    shared_memory = "tgi-zmq-" + runtime_dir.name + "-*"
    assert list(Path("/dev/shm").glob(shared_memory))
    (supervisord,) = children(guarded.process.pid)
    processes = children(supervisord)
    assert len(processes) == 5
    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60) and events, failures
    guarded.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (health := requests.get(guarded.url + "/health", timeout=5)).status_code == 200:
        assert time.monotonic() < deadline, "/health still 200 10 s after SIGTERM"
        time.sleep(0.05)
    assert health.status_code == 503
    assert len(events) < n, "the stream ended before the drain began"
    refused = requests.post(guarded.url + "/generate", json=PROMPT, headers=AUTH, timeout=10)
    assert refused.status_code == 503
    assert refused.json() == {"error": "the server is shutting down", "error_type": "unavailable"}

    reader.join(SHUTDOWN_TIMEOUT + 10)
    assert not reader.is_alive() and not failures, failures
    assert [event["index"] for event in events] == list(range(1, n + 1))
    assert events[-1]["generated_text"] is not None
    try:
        guarded.process.wait(timeout=SHUTDOWN_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the service did not exit within {SHUTDOWN_TIMEOUT + 30} s of SIGTERM:\n{guarded.log()[-3000:]}"
        )
    for pid in [supervisord, *processes]:  # everything stopped and cleaned up
        assert not Path(f"/proc/{pid}").exists()
    assert not list(Path("/dev/shm").glob(shared_memory))
    assert not runtime_dir.exists()
    log = guarded.log()
    assert "draining: 1 requests in flight" in log
    assert "drained: no request in flight" in log
    assert KEY not in log
