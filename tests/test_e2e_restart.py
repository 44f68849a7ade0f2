"""End to end: every process runs under supervisord, and SIGTERM stops them all and cleans up.

Killed and hung processes: tests/test_e2e_faults.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import children, pids, start_service, stop_service

pytestmark = pytest.mark.e2e


def test_every_process_runs_under_its_own_name(service):
    for name in ("frontend", "tokenizer", "scheduler", "detokenizer", "worker"):
        assert len(pids(service, name)) == 1, name


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
