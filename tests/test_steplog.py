"""The per-step log lines and scripts/timeline read one format: what the engine and the worker log,
the timeline parses back."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

from tgi_zmq.steplog import SCHEDULER_STEP, WORKER_STEP

TIMELINE = Path(__file__).resolve().parent.parent / "scripts" / "timeline"


def load_timeline():
    loader = importlib.machinery.SourceFileLoader("timeline", str(TIMELINE))
    spec = importlib.util.spec_from_loader("timeline", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_timeline_parses_what_the_processes_log():
    sched = SCHEDULER_STEP.format(
        step=7, requests=16, tokens=16, build_ms=0.41, ahead=1, wait_ms=30.0, forward_ms=29.5, apply_ms=0.2
    )
    worker = WORKER_STEP.format(step=7, idle_ms=0.3, worker_forward_ms=29.5, comm_ms=0.0)
    other = WORKER_STEP.format(step=7, idle_ms=9.9, worker_forward_ms=9.9, comm_ms=9.9)
    lines = [
        f"2026-12-01 10:00:00,000 DEBUG scheduler {sched}",
        f"2026-12-01 10:00:00,001 DEBUG worker-0 {worker}",
        f"2026-12-01 10:00:00,001 DEBUG worker-1 {other}",  # rank 0's figures only
    ]
    steps = load_timeline().parse(lines)
    assert steps == {
        7: dict(
            requests=16.0,
            tokens=16.0,
            build_ms=0.41,
            ahead=1.0,
            wait_ms=30.0,
            forward_ms=29.5,
            apply_ms=0.2,
            idle_ms=0.3,
            worker_forward_ms=29.5,
            comm_ms=0.0,
        )
    }
