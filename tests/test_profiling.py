"""Profiling without the service: the workers' torch.profiler recorder, the HTTP routes (404 without
--profile-dir), and how scripts/profile finds a process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio

from tests import helpers
from tgi_zmq import messages as m
from tgi_zmq.frontend import profile_routes
from tgi_zmq.profiling import StepProfiler, new_traces

log = logging.getLogger("test")


# ---------------------------------------------------------------------------- the recorder


def test_the_recorder_writes_a_chrome_trace_with_a_range_per_step(tmp_path: Path) -> None:
    profiler = StepProfiler("worker-0", "cpu", log)
    with profiler.step(1):  # not recording: nothing
        pass
    assert profiler.control(m.ProfileRequest("start", str(tmp_path / "traces"))) is None
    assert profiler.recording
    for step in (1, 2):
        with profiler.step(step):
            torch.ones(64, 64) @ torch.ones(64, 64)
    path = profiler.control(m.ProfileRequest("stop", str(tmp_path / "traces")))
    assert not profiler.recording
    assert path.parent == tmp_path / "traces" and path.name.startswith("worker-0-")
    assert path.name.endswith(".trace.json") and new_traces(path.parent, time.time() - 60) == [path]
    events = json.loads(path.read_text())["traceEvents"]
    names = {event.get("name") for event in events}
    assert {"step 1", "step 2"} <= names and any("mm" in str(name) for name in names)
    assert list(path.parent.iterdir()) == [path]  # no partial file left


def test_a_start_waits_for_the_load_that_imports_torchs_lazy_modules(tmp_path: Path) -> None:
    """The grammar engine's load imports torch._dynamo in its thread; torch.profiler's start imports it
    too: a start waits for the load (two threads importing one module graph at once broke a start)."""
    import threading
    from concurrent.futures import Future

    profiler = StepProfiler("worker-0", "cpu", log)
    profiler.after = loading = Future()
    # a failed load is an end too
    threading.Timer(0.5, lambda: loading.set_exception(OSError("no tokenizer"))).start()
    started = time.perf_counter()
    profiler.control(m.ProfileRequest("start", str(tmp_path)))  # the thread that steps (torch.profiler's)
    assert time.perf_counter() - started >= 0.45 and profiler.recording
    assert profiler.control(m.ProfileRequest("stop", str(tmp_path))) is not None


def test_the_recorder_survives_bad_requests(tmp_path: Path, caplog) -> None:
    profiler = StepProfiler("worker-1", "cpu", log)
    assert profiler.control(m.ProfileRequest("stop", str(tmp_path))) is None  # not recording
    assert profiler.control(m.ProfileRequest("pause", str(tmp_path))) is None
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    profiler.control(m.ProfileRequest("start", str(blocker / "traces")))  # not a folder it can make
    assert profiler.control(m.ProfileRequest("stop", str(blocker / "traces"))) is None
    assert not profiler.recording
    assert "profiling: stop failed" in caplog.text and "unknown action 'pause'" in caplog.text


def test_new_traces_are_those_written_since(tmp_path: Path) -> None:
    old, new, other = (tmp_path / n for n in ("worker-0-a.trace.json", "worker-1-b.trace.json", "x.json"))
    for path in (old, new, other):
        path.write_text("{}")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert new_traces(tmp_path, time.time() - 10) == [new]
    assert new_traces(tmp_path / "missing", 0.0) == []


# ---------------------------------------------------------------------------- the HTTP routes


@pytest.fixture
async def tokenizer_inbox(runtime_dir: str) -> AsyncIterator[zmq.asyncio.Socket]:
    """What the frontend sends to the tokenizer."""
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"ipc://{runtime_dir}/tokenizer.sock")
    yield pull
    ctx.destroy(linger=0)


async def next_profile_request(inbox: zmq.asyncio.Socket) -> m.ProfileRequest:
    """The next ``ProfileRequest`` the frontend sent (past its ``FrontendStarted``)."""
    while not isinstance(msg := m.decode(await asyncio.wait_for(inbox.recv(), 5)), m.ProfileRequest):
        pass
    return msg


async def test_the_routes_are_404_without_profile_dir(frontend_client) -> None:
    client = await frontend_client()
    for path in ("/start_profile", "/stop_profile"):
        response = await client.post(path)
        assert response.status == 404
        assert await response.json() == {
            "error": "profiling is off: start the server with --profile-dir DIR",
            "error_type": "not_found",
        }


async def test_the_routes_send_the_request_and_stop_lists_the_traces(
    frontend_client, tokenizer_inbox: zmq.asyncio.Socket, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(profile_routes, "STOP_WAIT_S", 0.5)
    folder = str(tmp_path)
    client = await frontend_client(profile_dir=folder)
    response = await client.post("/start_profile")
    assert response.status == 200 and await response.json() == {"directory": folder, "traces": []}
    assert await next_profile_request(tokenizer_inbox) == m.ProfileRequest("start", folder)

    async def worker_writes_its_trace() -> None:
        assert (await next_profile_request(tokenizer_inbox)).action == "stop"
        (tmp_path / "worker-0-20260101-000000-000.trace.json").write_text("{}")

    writer = asyncio.create_task(worker_writes_its_trace())
    response = await client.post("/stop_profile")
    await writer
    body = await response.json()
    assert response.status == 200 and body["traces"] == [f"{folder}/worker-0-20260101-000000-000.trace.json"]


async def test_the_routes_are_documented(frontend_client) -> None:
    client = await frontend_client()
    paths = (await (await client.get("/api-doc/openapi.json")).json())["paths"]
    for path in ("/start_profile", "/stop_profile"):
        operation = paths[path]["post"]
        assert "requestBody" not in operation and {"200", "404"} <= set(operation["responses"])


# ---------------------------------------------------------------------------- scripts/profile


def test_the_script_tells_the_pipeline_processes_apart() -> None:
    runs = helpers.load_script("profile").runs
    python = "/repo/.venv/bin/python"
    assert runs([python, "/repo/processes/tokenizer.py", ""], "tokenizer")
    assert not runs([python, "/repo/processes/detokenizer.py", ""], "tokenizer")
    assert runs([python, "/repo/processes/detokenizer.py", ""], "detokenizer")
    assert runs([python, "/repo/processes/worker.py", "--rank", "1"], "worker-1")
    assert not runs([python, "/repo/processes/worker.py", "--rank", "1"], "worker-0")
    assert not runs([python, "-m", "tgi_zmq.cli", "launch"], "frontend")


def test_the_script_finds_a_process_under_supervisord(tmp_path: Path, monkeypatch) -> None:
    """Its pid is the child of the supervisord of the runtime dir that runs processes/<name>.py."""
    script = helpers.load_script("profile")
    monkeypatch.setattr(script.tempfile, "gettempdir", lambda: str(tmp_path))
    runtime_dir = tmp_path / "tgi-zmq-abc"
    runtime_dir.mkdir()
    (runtime_dir / "supervisord.pid").write_text(f"{os.getpid()}\n")  # this test plays supervisord
    (runtime_dir / "config.json").write_text(json.dumps({"port": 8123, "profile_dir": None}))
    sleep = "import time; time.sleep(30)"
    children = [
        subprocess.Popen([sys.executable, "-c", sleep, "processes/scheduler.py"]),
        subprocess.Popen([sys.executable, "-c", sleep, "processes/worker.py", "--rank", "0"]),
    ]
    try:
        assert script.find_runtime_dir(None, None) == runtime_dir
        assert script.find_runtime_dir(None, 8123) == runtime_dir
        assert script.process_pid(runtime_dir, "scheduler") == children[0].pid
        assert script.process_pid(runtime_dir, "worker-0") == children[1].pid
        with pytest.raises(SystemExit):
            script.process_pid(runtime_dir, "worker-1")
        with pytest.raises(SystemExit):
            script.find_runtime_dir(None, 9999)
    finally:
        for child in children:
            child.kill()
            child.wait()
