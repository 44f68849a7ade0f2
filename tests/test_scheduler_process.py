"""Pure helpers of the scheduler process (processes/scheduler.py)."""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "scheduler_process", Path(__file__).resolve().parent.parent / "processes" / "scheduler.py"
)
scheduler_process = sys.modules["scheduler_process"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scheduler_process)


def test_clients_never_see_source_paths_of_a_worker_error():
    gloo = (
        "RuntimeError: [/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
        "[127.0.0.1]:41234\nException raised from recvFromPeer at /pytorch/torch/csrc/c10d/x.cpp:99"
    )
    reason = scheduler_process.public_reason(gloo)
    assert "/" not in reason and ".cc" not in reason and "\n" not in reason
    assert reason.startswith("RuntimeError:") and "Connection closed by peer" in reason
    assert scheduler_process.public_reason("") == "unknown error"
