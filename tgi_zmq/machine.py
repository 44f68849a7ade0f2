"""What the repository's scripts share: the machine a figure was measured on, the command that measured
it, and running in the repository's venv (scripts/bench, scripts/loadtime and scripts/chaos).

Only the standard library is imported at the top: a script imports this module with whatever ``python3``
started it, before it re-executes itself in the venv.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


def use_repo_venv(script: str) -> None:
    """Re-execute ``script`` with the repository's .venv python unless it already runs there (or there is
    none), so ``scripts/x`` works from any shell; the scripts never download, hence HF_HUB_OFFLINE."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if Path(sys.prefix).resolve() == VENV_PYTHON.parent.parent.resolve() or not VENV_PYTHON.exists():
        return
    os.execv(VENV_PYTHON, [str(VENV_PYTHON), str(Path(script).resolve()), *sys.argv[1:]])


def repo_command(argv: list[str] | None = None) -> str:
    """The command line as run from the repository root (``scripts/bench --json x.json``): recorded
    beside the figures, so it names neither the interpreter nor where this checkout lives."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    name = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else script.name
    return shlex.join([name, *argv[1:]])


def cpu_has_bf16() -> bool:
    """The CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): bfloat16 is then the fast dtype."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe() -> dict[str, Any]:
    """CPU model, torch's CPU capability (AVX2, AVX512...), cores, load and Python."""
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
