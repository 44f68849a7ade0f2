"""tgi-zmq's C++ extension (``csrc/``): quantized-weight matmuls and paged decode attention on CPU.

Compiled by ``scripts/setup`` or, when missing, by ``tgi-zmq launch`` (``build()``) into ``build/native/``
under a name keyed by the sources, our flags and torch version (its ABI), so a change is a new build and
never a stale .so; the processes only load it (``extension()``), never compile. Missing or broken: a
warning, and the callers use their torch fallbacks (``tgi_zmq.quant.kernels``' reference kernel,
``tgi_zmq.attention``'s gathered pages); ``describe()`` says which kernels serve (logs and /info).

``TGI_ZMQ_ISA=avx2|scalar`` caps its code path (to measure AVX2 on an AVX-512 machine).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

from tgi_zmq.machine import REPO

log = logging.getLogger(__name__)

SOURCES = [
    REPO / "csrc" / name
    for name in (
        "module.cpp",
        "qkernels.cpp",
        "gemv.cpp",
        "paged_attention.cpp",
        "rowwise.cpp",
        "llama_stack.cpp",
    )
]
HEADERS = [
    REPO / "csrc" / name
    for name in ("native.h", "isa.h", "paged_attention_isa.inc", "gemv_isa.inc", "rowwise_isa.inc")
]
BUILD_DIR = REPO / "build" / "native"
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}  # the extension's codes for TGI_ZMQ_ISA
# No -march: the AVX2/AVX-512 functions carry their own target attributes. -fopenmp: without it
# at::parallel_for runs serially in an extension (libgomp.so.1 is then torch's own, already loaded).
# Tuples: cpp_extension.load appends torch's libraries to the list it is given, and the name hashes
# these, so torch gets copies (a mutated list made a second build() in a process a new name, which
# rebuilt and deleted the build a running service loads).
CFLAGS, LDFLAGS = ("-O3", "-fopenmp"), ("-fopenmp",)

_ext: ModuleType | None = None
_ext_tried = False


def extension_name() -> str:
    key = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key += " ".join([torch.__version__, *CFLAGS, *LDFLAGS]).encode()
    return f"tgi_zmq_native_{hashlib.sha256(key).hexdigest()[:12]}"


def build(verbose: bool = False) -> ModuleType | None:
    """Compile the extension (once per source hash; seconds when built) and load it. None, with a
    warning, when the compiler fails."""
    global _ext, _ext_tried
    from torch.utils import cpp_extension

    name = extension_name()
    directory = BUILD_DIR / name
    directory.mkdir(parents=True, exist_ok=True)
    try:
        _ext = cpp_extension.load(
            name,
            [str(p) for p in SOURCES],
            list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            verbose=verbose,
        )
    except Exception as e:  # noqa: BLE001 - any compiler or loader failure leaves the fallbacks
        log.warning("native: building %s failed (%s); the torch fallbacks are used", SOURCES[0].parent, e)
        _ext = None
    else:
        for stale in BUILD_DIR.glob("tgi_zmq_native_*"):  # older sources' builds
            if stale.name != name:
                shutil.rmtree(stale, ignore_errors=True)
    _ext_tried = True
    return _ext


def library() -> Path:
    """Where the .so of these sources, flags and torch version is (or would be) built."""
    name = extension_name()
    return BUILD_DIR / name / f"{name}.so"


def extension() -> ModuleType | None:
    """The built extension, loaded without compiling (None, with one warning, when not built or when it
    does not load: a corrupt or ABI-broken .so must cost speed, not the first decode step)."""
    global _ext, _ext_tried
    if not _ext_tried:
        _ext_tried = True
        path = library()
        if path.exists():
            _ext = _load(path)
        else:
            log.warning("native: %s not built (run scripts/setup): the torch fallbacks are used", path)
    return _ext


def _load(path: Path) -> ModuleType | None:
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.isa_name(ISA)  # its bindings answer
    except Exception as e:  # noqa: BLE001 - whatever a broken build raises leaves the fallbacks
        log.warning(
            "native: %s does not load (%s): the torch fallbacks are used (delete %s to rebuild it)",
            path,
            e,
            path.parent,
        )
        return None
    return module


def describe(device: str = "cpu") -> str:
    """Which kernels serve on ``device``, for logs and /info: ``native avx512|avx2|scalar`` (the extension
    and its code path, TGI_ZMQ_ISA applied) or ``torch fallback``; off the CPU ``torch cuda`` (the
    extension is CPU-only). Loads the extension."""
    kind = device.split(":")[0]
    if kind != "cpu":
        return f"torch {kind}"
    ext = extension()
    return "torch fallback" if ext is None else f"native {ext.isa_name(ISA)}"


def log_kernels(logger: logging.Logger, device: str, launcher_found: str | None) -> str:
    """A process that runs the kernels says which it loaded; an error when the launcher found faster
    ones (this process's load failed: it runs slower than /info says)."""
    kernels = describe(device)
    if launcher_found is not None and kernels != launcher_found:
        logger.error("kernels: %s, not the launcher's %s (see the warning above)", kernels, launcher_found)
    else:
        logger.info("kernels: %s", kernels)
    return kernels


def env_isa() -> int:
    """The extension's code for ``TGI_ZMQ_ISA`` (auto: the best this CPU has)."""
    isa = os.environ.get("TGI_ZMQ_ISA", "auto").lower()
    if isa not in ISAS:
        raise ValueError(f"TGI_ZMQ_ISA={isa}: choose one of {', '.join(ISAS)}")
    return ISAS[isa]


ISA = env_isa()  # the code path the attention and gemv kernels run (read once, at import)

INVARIANT = False
"""Batch-invariant CPU steps (``--deterministic``): every matmul, attention and row-wise op of a step runs
a kernel of the extension that computes each token's row alike whatever the other rows of the step, so a
token's logits do not depend on its batch. Set by the worker before it loads the model; read per call."""


def invariant() -> bool:
    """Batch-invariant kernels are asked for and the extension is there to run them."""
    return INVARIANT and extension() is not None
