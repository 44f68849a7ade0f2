"""End to end: supervisord restarts a dead process; /health is 503 until all are ready again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import start_service, stop_service

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def own_service(tmp_path_factory):
    svc = start_service(
        tmp_path_factory.mktemp("restart"), "--dtype", "float32", "--max-batch-total-tokens", "8192"
    )
    yield svc
    stop_service(svc)


def pids(service, name: str) -> list[int]:
    """Pids of one pipeline process of this service (children of its supervisord)."""
    (supervisord,) = children(service.process.pid)
    return children(supervisord, f"processes/{name}.py")


def children(pid: int, pattern: str = ".") -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_for(predicate, timeout: float) -> float:
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return time.time() - start
        time.sleep(0.05)
    raise TimeoutError


def health(service) -> int:
    try:
        return requests.get(service.url + "/health", timeout=2).status_code
    except requests.RequestException:
        return 0


def test_every_process_runs_under_its_own_name(own_service):
    for name in ("frontend", "tokenizer", "scheduler", "detokenizer", "worker"):
        assert len(pids(own_service, name)) == 1, name


def test_killed_worker_fails_inflight_and_service_recovers(own_service):
    results = {}

    def long_request():
        body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 1500, "ignore_eos": True}}
        results["response"] = requests.post(own_service.url + "/generate", json=body, timeout=120)

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(2)
    (worker,) = pids(own_service, "worker")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: health(own_service) == 503, timeout=10)
    thread.join(timeout=30)
    response = results["response"]
    assert response.status_code == 424, response.text
    assert response.json()["error_type"] == "generation"
    wait_for(lambda: health(own_service) == 200, timeout=120)
    assert pids(own_service, "worker") != [worker]
    ok = requests.post(
        own_service.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, timeout=60
    )
    assert ok.status_code == 200, ok.text


def test_killed_detokenizer_is_restarted(own_service):
    (detok,) = pids(own_service, "detokenizer")
    os.kill(detok, signal.SIGKILL)
    wait_for(lambda: health(own_service) == 503, timeout=10)
    wait_for(lambda: health(own_service) == 200, timeout=60)
    ok = requests.post(
        own_service.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, timeout=60
    )
    assert ok.status_code == 200, ok.text


def test_sigterm_stops_everything_and_cleans_up(tmp_path):
    svc = start_service(tmp_path, "--dtype", "float32", "--max-batch-total-tokens", "4096")
    runtime_dir = Path(re.search(r"runtime dir (\S+);", svc.log()).group(1))
    shm_prefix = "tgi-zmq-" + runtime_dir.name
    assert list(Path("/dev/shm").glob(shm_prefix + "-*"))
    (supervisord,) = children(svc.process.pid)
    processes = children(supervisord)
    assert len(processes) == 5
    stop_service(svc)
    for pid in [supervisord, *processes]:
        assert not Path(f"/proc/{pid}").exists()
    assert not list(Path("/dev/shm").glob(shm_prefix + "-*"))
    assert not runtime_dir.exists()
