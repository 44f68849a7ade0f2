"""End to end: bad input gets TGI's error shape and code; disconnects free their requests; no process dies."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytestmark = pytest.mark.e2e


def post(service, path: str, body, **kwargs) -> requests.Response:
    return requests.post(service.url + path, json=body, timeout=60, **kwargs)


def assert_error(response: requests.Response, status: int, error_type: str, text: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type
    if text is not None:
        assert text in body["error"], body["error"]


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"max_new_tokens": 5000}, "`inputs` tokens + `max_new_tokens` must be <= 2048"),
        ({"truncate": 5000}, "`truncate` must be strictly positive and less than 2047"),
    ],
)
def test_invalid_parameters_422(service, parameters, message):
    response = post(service, "/generate", {"inputs": "Hello", "parameters": parameters})
    assert_error(response, 422, "validation", message)
    assert response.json()["error"].startswith("Input validation error: ")


def test_empty_and_too_long_inputs_422(service):
    assert_error(post(service, "/generate", {"inputs": ""}), 422, "validation", "`inputs` cannot be empty")
    long = "hello " * 2100
    response = post(service, "/generate", {"inputs": long, "parameters": {"max_new_tokens": 1}})
    assert_error(response, 422, "validation", "must be <= 2048")
    truncated = post(
        service,
        "/generate",
        {"inputs": long, "parameters": {"max_new_tokens": 2, "truncate": 100, "details": True}},
    )
    assert truncated.status_code == 200, truncated.text


def test_malformed_json_400_and_wrong_types_422(service):
    response = requests.post(
        service.url + "/generate", data="{not json", timeout=10, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert "error" in response.json() and "error_type" in response.json()
    assert post(service, "/generate", {"parameters": {}}).status_code == 422  # no inputs
    assert post(service, "/generate", ["a list"]).status_code == 422
    assert (
        post(service, "/generate", {"inputs": "x", "parameters": {"temperature": "hot"}}).status_code == 422
    )
    assert post(service, "/v1/chat/completions", {"messages": "hi"}).status_code == 422


def test_payload_over_limit_413(service):
    response = post(service, "/generate", {"inputs": "x" * 2_100_000})
    assert response.status_code == 413
    assert "error_type" in response.json()


def test_overload_429(service):
    body = {"inputs": "Count slowly:", "parameters": {"max_new_tokens": 60}}
    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda _: post(service, "/generate", body).status_code, range(20)))
    assert codes.count(429) >= 1, codes
    assert set(codes) <= {200, 429}
    overloaded = [c for c in codes if c == 429]
    assert len(overloaded) <= 20 - 12
    assert requests.get(service.url + "/health", timeout=5).status_code == 200


def test_client_disconnect_aborts_request(service):
    body = json.dumps({"inputs": "Write a long story:", "parameters": {"max_new_tokens": 1000}})
    host, port = service.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(
        "POST",
        "/generate_stream",
        body,
        {"Content-Type": "application/json", "x-request-id": "disconnect-me"},
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.read(5) == b"data:"  # the stream is running
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        rid = re.search(r"rid=(disconnect-me-\w+) received", service.log())
        if rid and re.search(rf"scheduler rid={re.escape(rid.group(1))} aborted", service.log()):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the scheduler never aborted the disconnected request:\n" + service.log()[-3000:])
    # ... and the service keeps serving.
    assert (
        post(service, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200
    )


def test_the_clients_request_id_names_the_request_in_every_process_and_comes_back(service):
    ids = []
    for _ in range(2):  # clients reuse ids: each request still gets its own
        response = post(
            service,
            "/generate",
            {"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
            headers={"x-request-id": "job 7/a"},
        )
        assert response.status_code == 200 and response.headers["x-request-id"] == "job 7/a"
        ids = logged(service, r"rid=(job_7_a-[0-9a-f]{12}) received", count=len(ids) + 1)
    assert len(ids) == 2 and ids[0] != ids[1]
    for process in ("tokenizer", "scheduler", "frontend"):  # the detokenizer logs at DEBUG
        assert logged(service, rf"{process} rid=({ids[1]})\b"), process
    refused = post(service, "/generate", {"inputs": ""}, headers={"x-request-id": "bad-one"})
    assert refused.status_code == 422 and refused.headers["x-request-id"] == "bad-one"
    assert logged(service, r"rid=(bad-one-[0-9a-f]{12}) failed status=422")


def logged(service, pattern: str, count: int = 1, timeout: float = 10) -> list[str]:
    """The matches of ``pattern`` in the service's log, once there are ``count`` (log lines come a
    little after the responses: supervisord passes them on)."""
    deadline = time.time() + timeout
    while len(found := re.findall(pattern, service.log())) < count and time.time() < deadline:
        time.sleep(0.1)
    return found


def test_chat_template_errors_are_422(service):
    response = post(service, "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert response.status_code == 422
    assert "error_type" in response.json()


def test_completions_suffix_and_batch_limits(service):
    assert_error(
        post(service, "/v1/completions", {"prompt": "a", "suffix": "b"}), 422, "suffix not supported"
    )
    response = post(service, "/v1/completions", {"prompt": ["a"] * 5, "max_tokens": 2})
    assert_error(response, 422, "batch size exceeded")
    ok = post(service, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_bad_input_at_the_http_edge_gets_tgis_error_shape(service):
    lone = '"\\ud800 lone surrogate"'  # valid JSON, but no text
    json_type = {"Content-Type": "application/json"}
    for path, body in (("/generate", f'{{"inputs": {lone}}}'), ("/tokenize", f'{{"inputs": {lone}}}')):
        response = requests.post(service.url + path, data=body, headers=json_type, timeout=10)
        assert_error(response, 422, "validation", "`inputs` is not valid Unicode text")
    chat = f'{{"messages": [{{"role": "user", "content": "hi"}}], "stop": [{lone}]}}'
    response = requests.post(service.url + "/v1/chat/completions", data=chat, headers=json_type, timeout=10)
    assert_error(response, 422, "validation", "`stop[0]` is not valid Unicode text")
    untyped = requests.post(service.url + "/generate", data='{"inputs": "hi"}', timeout=10)
    assert_error(untyped, 415, "unsupported_media_type", "Content-Type: application/json")
    assert_error(requests.get(service.url + "/v2/models", timeout=10), 404, "not_found")
    wrong_method = requests.get(service.url + "/generate", timeout=10)
    assert_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["Allow"] == "POST"


def test_no_bad_input_took_a_process_down(service):
    """Runs last in this module: after every bad input above, no process exited or restarted."""
    assert "exited:" not in service.log()
    assert "restarted" not in service.log()
    assert requests.get(service.url + "/health", timeout=5).status_code == 200
