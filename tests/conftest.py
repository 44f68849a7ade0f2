"""The real service for end-to-end tests (`tgi-zmq launch`: supervisord and every process), and the
frontend's app alone for the unit tests of its routes."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from tgi_zmq.config import ServerConfig
from tgi_zmq.convert import ensure_default_model

if TYPE_CHECKING:
    from aiohttp.test_utils import TestClient


@dataclass
class Service:
    url: str
    log_path: Path
    process: subprocess.Popen
    model_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.log()[-4000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"service not healthy after {timeout}s:\n{self.log()[-4000:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports_below_ephemeral(count: int) -> int:
    """The first of ``count`` consecutive free ports under the kernel's ephemeral range: a socket that
    keeps connecting to a port in that range until its server is up can be given that very port as
    its own, and then talks to itself (TCP's simultaneous open) and holds the port."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        first = random.randrange(20000, low - count)
        try:
            with contextlib.ExitStack() as held:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no free ports under the ephemeral range")


def start_service(tmp: Path, *flags: str, log_level: str = "INFO", port: int | None = None) -> Service:
    """``spawn_service``, healthy (stopped if it never gets there)."""
    service = spawn_service(tmp, *flags, log_level=log_level, port=port)
    try:
        service.wait_healthy()
    except BaseException:
        stop_service(service)  # a service that never got healthy must not outlive its test
        raise
    return service


def spawn_service(tmp: Path, *flags: str, log_level: str = "INFO", port: int | None = None) -> Service:
    """``tgi-zmq launch`` with ``flags``, not waited for (``Service.wait_healthy``; stop it with
    ``stop_service`` whatever happens)."""
    port = port or free_port()
    log_path = tmp / "service.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOG_LEVEL=log_level)
    cmd = [
        sys.executable,
        "-m",
        "tgi_zmq.cli",
        "launch",
        "--port",
        str(port),
        "--hostname",
        "127.0.0.1",
        *flags,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Service(f"http://127.0.0.1:{port}", log_path, process, ensure_default_model())


_stopping: list[Service] = []  # told to stop, waited for at the end of the session


def stop_service(service: Service, wait: bool = True) -> None:
    """SIGTERM the launcher. ``wait=False`` (fixtures' teardown) lets the few seconds of the stop
    overlap the next tests; ``pytest_sessionfinish`` waits for it."""
    service.process.send_signal(signal.SIGTERM)
    if wait:
        _reap(service)
    else:
        _stopping.append(service)


def _reap(service: Service) -> None:
    try:
        service.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(service.process.pid, signal.SIGKILL)
        raise


def pytest_sessionfinish(session, exitstatus) -> None:
    while _stopping:
        _reap(_stopping.pop())


def pids(service: Service, name: str) -> list[int]:
    """Pids of this service's pipeline processes whose command line has ``processes/<name>``."""
    (supervisord,) = children(service.process.pid)
    return children(supervisord, f"processes/{name}")


def children(pid: int, pattern: str = ".") -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (for the pure tests of tokenizing, detokenizing and tools)."""
    from transformers import AutoTokenizer

    from tgi_zmq.convert import default_model_dir

    folder = default_model_dir()
    if not (folder / "tokenizer.json").exists():
        pytest.skip("default model not converted (./scripts/setup does it)")
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def service(tmp_path_factory) -> Service:
    """One float32 service shared by the end-to-end tests (float32: exact against transformers)."""
    svc = start_service(
        tmp_path_factory.mktemp("service"),
        "--dtype",
        "float32",
        "--max-batch-total-tokens",
        "16384",
        "--max-total-tokens",
        "2048",
        "--max-concurrent-requests",
        "12",
        "--enable-prefill-logprobs",
        "--max-best-of",
        "4",
    )
    yield svc
    stop_service(svc, wait=False)


@pytest.fixture(scope="session")
def flagged_service(tmp_path_factory) -> Iterator[Service]:
    """One float32 service with the flags that some tests need and the shared one must not have, with
    DEBUG logs: a folder for profiles (tests/test_e2e_profiling.py) and a grammar compile timeout of
    0.25 s (tests/test_e2e_grammar.py's slow grammar; too short for the shared service's grammars on a
    busy machine). Started by the first test that needs it."""
    tmp = tmp_path_factory.mktemp("flagged")
    svc = start_service(
        tmp,
        *("--dtype", "float32", "--max-batch-total-tokens", "4096", "--profile-dir", str(tmp / "traces")),
        *("--grammar-compile-timeout", "0.25"),
        log_level="DEBUG",
    )
    yield svc
    stop_service(svc, wait=False)


@pytest.fixture(scope="session")
def sharded_service(tmp_path_factory) -> Iterator[Service]:
    """One float32 service on two tensor-parallel ranks, shared by the tests of two shards (tokens and
    weights per rank: tests/test_e2e_parallel.py; a rank killed under load: tests/test_e2e_faults.py,
    which waits until it serves again). Started by the first test that needs it."""
    svc = start_service(
        tmp_path_factory.mktemp("sharded"),
        *("--num-shard", "2", "--master-port", str(free_port()), "--dtype", "float32"),
        *("--max-batch-total-tokens", "8192", "--max-total-tokens", "1024"),
    )
    yield svc
    stop_service(svc, wait=False)


@pytest.fixture(scope="session")
def faulty(tmp_path_factory) -> Iterator[Service]:
    """One bfloat16 service for the fault tests, shared by tests/test_e2e_faults.py (processes killed or
    hung under load, replayed to the same tokens: batch-invariant steps; a short watchdog),
    tests/test_e2e_isolation.py (requests poisoned through the test hook ``TGI_ZMQ_TEST_FAULTS``, set
    for this service only: tgi_zmq/runtime.py), tests/test_e2e_invariance.py (prompts prefilled in
    chunks of 256 beside decodes) and tests/test_e2e_models.py (SmolLM2 in bfloat16 still says Paris)."""
    from tests.test_e2e_isolation import POISON
    from tgi_zmq.runtime import TEST_FAULTS_ENV

    faults = ",".join(f"{message}:{seed}" for message, seed in POISON.values())
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TEST_FAULTS_ENV, faults)  # the service's processes inherit it; this one does not keep it
        svc = start_service(
            tmp_path_factory.mktemp("faults"),
            *("--dtype", "bfloat16", "--max-batch-total-tokens", "8192", "--max-total-tokens", "1024"),
            *("--watchdog-timeout", "5", "--max-concurrent-requests", "32"),
            *("--max-batch-prefill-tokens", "256"),
        )
    yield svc
    stop_service(svc, wait=False)


@pytest.fixture(scope="session")
def two_ranks() -> Iterator[Any]:
    """Two rank processes shared by the session's two-rank checks (tests/helpers.py's ``TwoRanks``)."""
    from tests.helpers import TwoRanks

    pair = TwoRanks()
    yield pair
    pair.stop()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Iterator[Callable[..., Path]]:
    """``tiny_models(arch, smol_tokenizer=False, **overrides)``: the folder of tests/helpers.py's
    ``tiny_model(arch, **overrides)`` (with SmolLM2's tokenizer beside it if asked), built once a
    session and shared. Read only: a test that changes a model copies it or builds its own; the end
    of the session checks that no file in a shared folder was added, removed or rewritten."""
    from tests.helpers import copy_smol_tokenizer, tiny_model  # the model stack: only when asked for

    built: dict[tuple, tuple[Path, dict]] = {}

    def folder(arch: str, smol_tokenizer: bool = False, **overrides) -> Path:
        key = (arch, smol_tokenizer, *sorted(overrides.items()))
        if key not in built:
            path = tiny_model(arch, tmp_path_factory.mktemp(arch), **overrides)
            if smol_tokenizer:
                copy_smol_tokenizer(path)
            built[key] = path, _files(path)
        return built[key][0]

    yield folder
    changed = [str(path) for path, files in built.values() if _files(path) != files]
    assert not changed, f"a test wrote into the shared tiny models {changed} (copy one to change it)"


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file under ``folder``: its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def hub_online(monkeypatch):
    """huggingface_hub refuses every URL, localhost included, under HF_HUB_OFFLINE=1 (which
    ./scripts/test sets so nothing reaches for the hub): let its client talk to our service."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _http.reset_sessions()
    yield
    monkeypatch.undo()
    _http.reset_sessions()


# ---------------------------------------------------------------------------- the frontend alone


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    """A runtime folder of a frontend without the pipeline's processes (its sockets' ipc paths)."""
    with tempfile.TemporaryDirectory(prefix="tgizmq-") as path:  # short: ipc paths are limited
        yield path


def frontend_config(runtime_dir: str, **fields: Any) -> ServerConfig:
    return ServerConfig(model_id="none", served_model_names=("m",), runtime_dir=runtime_dir, **fields)


@pytest.fixture
async def frontend_client(
    runtime_dir: str, monkeypatch
) -> AsyncIterator[Callable[..., Awaitable[TestClient]]]:
    """``await frontend_client(**config)``: an HTTP client of the frontend's app (config fields over
    ``frontend_config``) listening on a local port, with its pipeline's sockets in ``runtime_dir`` and
    no process behind them. Closed after the test (at once: no tokenizer will take its queued frames)."""
    from aiohttp.test_utils import TestClient, TestServer

    from tgi_zmq.frontend import create_app, pipeline

    monkeypatch.setattr(pipeline, "CLOSE_LINGER_MS", 0)

    clients: list[TestClient] = []

    async def start(**fields: Any) -> TestClient:
        client = TestClient(TestServer(create_app(frontend_config(runtime_dir, **fields))))
        clients.append(client)
        await client.start_server()
        return client

    yield start
    for client in clients:
        await client.close()
