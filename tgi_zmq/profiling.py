"""torch.profiler over a worker's steps, started and stopped by a ``ProfileRequest`` between two steps.

``scripts/profile worker-N --torch`` and ``POST /start_profile`` / ``/stop_profile`` send the request to
the scheduler, which passes it to every worker (``WorkerGroup.broadcast``). While it records, each
step runs inside ``record_function("step N")``; on "stop" the worker writes a Chrome/Perfetto trace,
``<directory>/worker-<rank>-<time>.trace.json`` (written under a temporary name, then renamed: a file
with that name is whole). Not recording costs nothing but a ``nullcontext`` per step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

from tgi_zmq.messages import ProfileRequest

TRACE_GLOB = "worker-*.trace.json"
IMPORTS_TIMEOUT_S = 120.0  # at most this long a "start" waits for ``StepProfiler.after``
MTIME_SLACK_S = 0.05  # file times come from the kernel's coarse clock, a few ms behind time.time()


def trace_name(process: str, when: float) -> str:
    """``worker-<rank>-<YYYYmmdd-HHMMSS-mmm>.trace.json`` (local time, to the millisecond)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    return f"{process}-{stamp}-{int(when * 1000) % 1000:03d}.trace.json"


class StepProfiler:
    """One process's recorder: idle, or recording into the directory its "start" named."""

    def __init__(self, process: str, device: str, log: logging.Logger) -> None:
        self.process, self.device, self.log = process, device, log
        self.profile: Any = None  # a running torch.profiler.profile
        self.directory: Path | None = None
        # A load in another thread that imports torch's lazy modules (the grammar engine's: transformers
        # imports torch._dynamo and torch._inductor). torch.profiler imports them too, and two threads
        # importing one module graph at once can get a partial module (ImportError: a CI run did).
        self.after: Future | None = None

    @property
    def recording(self) -> bool:
        return self.profile is not None

    def control(self, msg: ProfileRequest) -> Path | None:
        """Act on a request; returns the trace written by a "stop". A failure (a directory it cannot
        write) is logged: it must not take the worker down."""
        try:
            if msg.action == "start":
                self.start(Path(msg.directory))
            elif msg.action == "stop":
                return self.stop()
            else:
                self.log.error("profiling: unknown action %r", msg.action)
        except Exception:
            self.log.exception("profiling: %s failed", msg.action)
        return None

    def start(self, directory: Path) -> None:
        if self.recording:
            self.log.warning("profiling: already recording into %s", self.directory)
            return
        if self.after is not None:
            wait([self.after], timeout=IMPORTS_TIMEOUT_S)
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.startswith("cuda") and torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.profile = profile(activities=activities, record_shapes=False, with_stack=False)
        self.profile.start()
        self.directory = directory
        self.log.info("profiling: recording steps with torch.profiler (%s)", self._activities(activities))

    def stop(self) -> Path | None:
        """Stop recording and write the trace; None when not recording."""
        if not self.recording:
            self.log.warning("profiling: stop while not recording")
            return None
        profile, directory = self.profile, self.directory
        self.profile = self.directory = None
        profile.stop()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / trace_name(self.process, time.time())
        partial = path.with_name(path.name + ".partial")
        profile.export_chrome_trace(str(partial))
        partial.rename(path)
        self.log.info("profiling: trace written to %s", path)
        return path

    def step(self, step_id: int) -> contextlib.AbstractContextManager[Any]:
        """Wrap one step: a named range in the trace while recording, else nothing."""
        if self.profile is None:
            return contextlib.nullcontext()
        from torch.profiler import record_function

        return record_function(f"step {step_id}")

    @staticmethod
    def _activities(activities: list[Any]) -> str:
        return " + ".join(a.name for a in activities)


def new_traces(directory: Path, since: float) -> list[Path]:
    """The whole traces in ``directory`` written at or after ``since`` (``time.time()``), by name."""
    found = []
    for path in directory.glob(TRACE_GLOB):
        with contextlib.suppress(OSError):  # removed meanwhile
            if path.stat().st_mtime >= since - MTIME_SLACK_S:
                found.append(path)
    return sorted(found)
