"""End to end, one service with --profile-dir and DEBUG logs: scripts/profile (py-spy and torch.profiler)
and the HTTP routes record while a greedy generation runs, whose text stays the same; the stage
histograms fill; scripts/timeline follows one request through every process. (The routes' 404 without
--profile-dir: tests/test_profiling.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from tests.conftest import Service

pytestmark = pytest.mark.e2e

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
BODY = {"inputs": "Once upon a time, in a small village", "parameters": {"max_new_tokens": 32}}


@pytest.fixture
def profiled(flagged_service: Service) -> Service:
    """The session's service with --profile-dir and DEBUG logs (tests/conftest.py)."""
    return flagged_service


def generate(service: Service, headers: dict[str, str] | None = None) -> str:
    response = requests.post(service.url + "/generate", json=BODY, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


class Load:
    """The same greedy generation over and over in a thread, while the recorders run."""

    def __init__(self, service: Service) -> None:
        self.service, self.texts, self.stop = service, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.texts.append(generate(self.service))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=120)


def profile(service: Service, *args: str) -> Path:
    """Run scripts/profile on the service; the path it says it wrote."""
    port = service.url.rsplit(":", 1)[1]
    cmd = [sys.executable, str(SCRIPTS / "profile"), *args, "--seconds", "2", "--port", port]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return Path(re.search(r"^wrote (\S+)$", done.stdout, re.M)[1])


def trace_events(path: Path) -> list[dict]:
    events = json.loads(path.read_text())["traceEvents"]
    assert any(event.get("name", "").startswith("step ") for event in events), path
    return events


def test_profiling_records_while_serving_the_same_tokens(profiled: Service, tmp_path: Path) -> None:
    reference = generate(profiled, {"x-request-id": "unprofiled"})
    with Load(profiled) as load:
        flame = profile(profiled, "scheduler", "--out", str(tmp_path / "scheduler.svg"))
        assert flame == tmp_path / "scheduler.svg" and b"<svg" in flame.read_bytes()[:1000]

        trace = profile(profiled, "worker-0", "--torch")
        assert trace.parent.name == "traces" and trace.name.startswith("worker-0-")  # the --profile-dir
        assert trace_events(trace)

        assert requests.post(profiled.url + "/start_profile", timeout=10).status_code == 200
        generate(profiled)
        stopped = requests.post(profiled.url + "/stop_profile", timeout=60)
        assert stopped.status_code == 200, stopped.text
        (path,) = stopped.json()["traces"]
        assert Path(path) != trace and trace_events(Path(path))
    assert len(load.texts) >= 2 and set(load.texts) == {reference}

    metrics = requests.get(profiled.url + "/metrics", timeout=10).text
    for stage in ("tokenize", "queue", "prefill", "decode", "detokenize"):
        count = re.search(rf'^tgi_request_stage_duration_count{{stage="{stage}"}} (\S+)$', metrics, re.M)
        assert float(count[1]) >= 3, stage


def test_the_timeline_follows_a_request_through_every_process(profiled: Service) -> None:
    generate(profiled, {"x-request-id": "followed"})
    rid = re.search(r"rid=(followed-\w+) received", profiled.log())[1]
    cmd = [sys.executable, str(SCRIPTS / "timeline"), str(profiled.log_path), "--request", rid]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()[2:]  # under the title and the header: +ms, gap ms, process, line
    assert {row.split()[2] for row in rows} == {"frontend", "tokenizer", "scheduler", "detokenizer"}
    for event in ("received", "tokenized", "queued", "scheduled", "first token", "detokenized", "finished"):
        assert event in done.stdout, event
