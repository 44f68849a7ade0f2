"""End to end: `tgi-zmq launch --replicas 2`: two services behind the real SMG router (its binary, from
the `smg` wheel), each replica reached through SMG answering as it answers directly."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import (
    Service,
    children,
    free_port,
    free_ports_below_ephemeral,
    start_service,
    stop_service,
)
from tgi_zmq.replicas import SMG

pytestmark = pytest.mark.e2e

ROUTED_TO = "x-smg-routed-worker-id"  # SMG's response header: the replica that answered
STORY = "In a quiet harbour town, an old sailor kept a notebook of every ship that passed, and one day"


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.3)


def healthy_replicas(url: str) -> set[str]:
    """The replicas SMG sees healthy."""
    try:
        workers = requests.get(url + "/workers", timeout=5).json()["workers"]
    except (requests.RequestException, ValueError, KeyError):
        return set()
    return {w["url"] for w in workers if w["is_healthy"]}


@pytest.fixture(scope="module")
def replicated(tmp_path_factory) -> Service:
    svc = start_service(
        tmp_path_factory.mktemp("replicas"),
        *("--replicas", "2", "--dtype", "auto", "--max-batch-total-tokens", "4096"),
        *("--max-total-tokens", "1024", "--max-concurrent-requests", "16"),
        port=free_ports_below_ephemeral(4),  # SMG, 2 replicas, SMG's metrics; SMG probes the replicas
    )  # before they listen: ports a client is never given as its own (free_ports_below_ephemeral)
    svc.replica_urls = [f"http://127.0.0.1:{int(svc.url.rsplit(':', 1)[1]) + 1 + i}" for i in range(2)]
    wait_until(lambda: len(healthy_replicas(svc.url)) == 2, 120, "SMG never saw both replicas healthy")
    yield svc
    stop_service(svc, wait=False)


def post(url: str, path: str, body: dict, **kwargs) -> requests.Response:
    response = requests.post(url + path, json=body, timeout=120, **kwargs)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response


def sse_data(response: requests.Response) -> list[dict]:
    events = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    return [json.loads(event) for event in events if event != "[DONE]"]


CHAT = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 12, "temperature": 0}
COMPLETION = {"prompt": STORY, "max_tokens": 12, "temperature": 0}
GENERATE = {"inputs": STORY, "parameters": {"max_new_tokens": 12}}


def answers(url: str, model: str) -> dict[str, object]:
    """What each route gives (greedy), streamed and not, asked of ``url``."""
    chat, completion = dict(CHAT, model=model), dict(COMPLETION, model=model)
    streamed_generate = post(url, "/generate", dict(GENERATE, stream=True))
    return {
        "chat": post(url, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"],
        "chat stream": "".join(
            e["choices"][0]["delta"].get("content") or ""
            for e in sse_data(post(url, "/v1/chat/completions", dict(chat, stream=True)))
            if e["choices"]
        ),
        "completion": post(url, "/v1/completions", completion).json()["choices"][0]["text"],
        "completion stream": "".join(
            e["choices"][0]["text"]
            for e in sse_data(post(url, "/v1/completions", dict(completion, stream=True)))
        ),
        "generate": post(url, "/generate", GENERATE).json()["generated_text"],
        "generate stream": [e["token"]["id"] for e in sse_data(streamed_generate)],
    }


def test_smg_carries_chat_completions_and_generate_with_a_replicas_tokens(replicated):
    direct = answers(replicated.replica_urls[0], "tgi")
    assert all(direct.values()), direct
    assert direct["chat"] == direct["chat stream"] and direct["completion"] == direct["completion stream"]
    tgi_stream = [
        e["token"]["id"] for e in sse_data(post(replicated.replica_urls[0], "/generate_stream", GENERATE))
    ]
    assert direct["generate stream"] == tgi_stream  # /generate with "stream" is /generate_stream
    assert answers(replicated.url, "tgi") == direct  # the name of TGI's examples
    chat = dict(CHAT, model="SmolLM2-135M-Instruct")  # and the model's own
    assert (
        post(replicated.url, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
        == direct["chat"]
    )
    # What SMG 1.13 does not carry (docs/scale-out.md says so): TGI's own streaming route and POST /.
    assert requests.post(replicated.url + "/generate_stream", json=GENERATE, timeout=30).status_code == 404
    assert requests.post(replicated.url + "/", json=GENERATE, timeout=30).status_code == 404


def test_both_replicas_serve_and_smg_reads_their_loads(replicated):
    words = (
        "apple river stone cloud maple tiger violin copper garden winter lantern ocean pepper silver".split()
    )
    prompts = [f"{words[i % 14]} {words[(3 * i + 1) % 14]} {i}: tell me more." for i in range(32)]
    with ThreadPoolExecutor(16) as pool:  # 16 at once: SMG spills past 4 over the mean (SPILL_REQUESTS)
        routed = list(
            pool.map(
                lambda p: post(
                    replicated.url, "/v1/completions", {"model": "tgi", "prompt": p, "max_tokens": 12}
                ).headers[ROUTED_TO],
                prompts,
            )
        )
    assert set(routed) == set(replicated.replica_urls), collections.Counter(routed)

    def loads_read() -> list[dict]:
        workers = requests.get(replicated.url + "/workers", timeout=5).json()["workers"]
        return workers if all("engine_load" in w for w in workers) else []

    wait_until(loads_read, 15, "SMG read no load of ours")  # it polls /v1/loads every 2 s
    for worker in loads_read():
        (load,) = worker["engine_load"]["loads"]  # SMG's copy of our /v1/loads
        ours = requests.get(worker["url"] + "/v1/loads", timeout=5).json()["loads"][0]
        assert load["max_total_num_tokens"] == ours["max_total_num_tokens"] == 4096
        assert load["max_running_requests"] == ours["max_running_requests"] == 16


def prefix_hits(urls: list[str]) -> float:
    """The replicas' prefix-cache hit tokens, once settled: a scheduler reports them every half second."""
    last = None
    while True:
        total = 0.0
        for url in urls:
            for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
                if line.startswith("vllm:prefix_cache_hits_total{"):
                    total += float(line.rsplit(" ", 1)[1])
        if total == last:
            return total
        last = total
        time.sleep(1.0)


def conversations(url: str, tag: str) -> dict[int, set[str]]:
    """3 conversations of 4 turns, each turn the whole history again: the replicas each turn went to (3:
    round-robin moves each one to the other replica every turn). Each turn adds a long message, so a
    replica that missed the last turn finds less of the prompt cached than the one that served it."""
    routed: dict[int, set[str]] = collections.defaultdict(set)
    histories = {c: [{"role": "system", "content": f"{tag} conversation {c}."}] for c in range(3)}
    for turn in range(4):
        for c, history in histories.items():
            history.append({"role": "user", "content": f"Turn {turn}, go on: {STORY} {STORY}"})
            body = {"model": "tgi", "messages": history, "max_tokens": 4, "temperature": 0}
            response = post(url, "/v1/chat/completions", body)
            routed[c].add(response.headers[ROUTED_TO])
            history.append(
                {"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]}
            )
    return routed


def test_cache_aware_keeps_a_conversation_on_one_replica_for_more_prefix_hits(replicated, tmp_path):
    before = prefix_hits(replicated.replica_urls)
    routed = conversations(replicated.url, "cache-aware")
    cache_aware_hits = prefix_hits(replicated.replica_urls) - before
    assert all(len(replicas) == 1 for replicas in routed.values()), routed

    port = free_port()  # the same replicas behind a second SMG that takes turns
    robin = subprocess.Popen(
        [str(SMG), "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"]
        + ["--worker-urls", *replicated.replica_urls, "--prometheus-port", str(free_port())]
        + ["--worker-startup-check-interval", "1", "--model-alias", "tgi=SmolLM2-135M-Instruct"],
        stdout=(tmp_path / "smg.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: len(healthy_replicas(url)) == 2, 60, "the round-robin SMG never saw both replicas")
        before = prefix_hits(replicated.replica_urls)
        spread = conversations(url, "round-robin")
        robin_hits = prefix_hits(replicated.replica_urls) - before
    finally:
        robin.terminate()
        robin.wait(timeout=30)
    assert all(len(replicas) == 2 for replicas in spread.values()), spread
    print(f"prefix-cache hit tokens: cache_aware {cache_aware_hits:.0f}, round_robin {robin_hits:.0f}")
    assert cache_aware_hits > 1.5 * robin_hits, (cache_aware_hits, robin_hits)


def replica_supervisord(service: Service, index: int) -> int:
    (top,) = children(service.process.pid)
    for pid in children(top, "supervisord.conf"):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"TGI_ZMQ_REPLICA={index}".encode() in environ:
            return pid
    raise AssertionError(f"no replica {index}")


def test_a_killed_replica_is_routed_around_and_comes_back(replicated):
    """Runs last on the replica set (it kills one)."""
    body = {"model": "tgi", "prompt": STORY, "max_tokens": 10, "temperature": 0}
    reference = post(replicated.replica_urls[1], "/v1/completions", body).json()["choices"][0]["text"]
    victim = replica_supervisord(replicated, 0)
    pipeline = children(victim)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in pipeline), 30, "its processes lived on"
    )
    served = []
    for _ in range(3):  # while it is down: every answer from the other, with the same tokens
        response = post(replicated.url, "/v1/completions", body)
        served.append((response.headers[ROUTED_TO], response.json()["choices"][0]["text"]))
    assert served == [(replicated.replica_urls[1], reference)] * 3
    wait_until(lambda: len(healthy_replicas(replicated.url)) == 2, 120, "the killed replica never came back")
    for i in range(12):  # in rotation again
        prompt = {"model": "tgi", "prompt": f"Fresh prompt {i}: {STORY}", "max_tokens": 2}
        if post(replicated.url, "/v1/completions", prompt).headers[ROUTED_TO] == replicated.replica_urls[0]:
            break
    else:
        pytest.fail("no request went to the restarted replica")
    direct = post(replicated.replica_urls[0], "/v1/completions", body).json()["choices"][0]["text"]
    assert direct == reference
