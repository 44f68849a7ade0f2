"""End to end: every process runs under supervisord. SIGTERM stops them all and cleans up:
tests/test_e2e_guards.py (after draining a request); killed and hung processes: tests/test_e2e_faults.py."""

from __future__ import annotations

import pytest

from tests.conftest import pids

pytestmark = pytest.mark.e2e


def test_every_process_runs_under_its_own_name(service):
    for name in ("frontend", "tokenizer", "scheduler", "detokenizer", "worker"):
        assert len(pids(service, name)) == 1, name
