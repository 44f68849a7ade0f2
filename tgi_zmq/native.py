"""tgi-zmq's C++ extension (``csrc/``): quantized-weight matmuls and paged decode attention on CPU.

Compiled by ``scripts/setup`` (``build()``) into ``build/native/`` under a name keyed by the sources,
flags and torch version (its ABI), so a change is a new build and never a stale .so; at run time it is
only loaded (``extension()``), never compiled. Missing or broken: a warning, and the callers use their
torch fallbacks (``tgi_zmq.quant.kernels``' reference kernel, ``tgi_zmq.attention``'s gathered pages).

``TGI_ZMQ_ISA=avx2|scalar`` caps its code path (to measure AVX2 on an AVX-512 machine).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from types import ModuleType

import torch

from tgi_zmq.machine import REPO

log = logging.getLogger(__name__)

SOURCES = [REPO / "csrc" / name for name in ("module.cpp", "qkernels.cpp", "gemv.cpp", "paged_attention.cpp")]
HEADERS = [REPO / "csrc" / name for name in ("native.h", "isa.h", "paged_attention_isa.inc", "gemv_isa.inc")]
BUILD_DIR = REPO / "build" / "native"
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}  # the extension's codes for TGI_ZMQ_ISA
# No -march: the AVX2/AVX-512 functions carry their own target attributes. -fopenmp: without it
# at::parallel_for runs serially in an extension (libgomp.so.1 is then torch's own, already loaded).
CFLAGS, LDFLAGS = ["-O3", "-fopenmp"], ["-fopenmp"]

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
            CFLAGS,
            extra_ldflags=LDFLAGS,
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


def extension() -> ModuleType | None:
    """The built extension, loaded without compiling (None, with one warning, when not built)."""
    global _ext, _ext_tried
    if not _ext_tried:
        _ext_tried = True
        name = extension_name()
        path = BUILD_DIR / name / f"{name}.so"
        if path.exists():
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            _ext = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(_ext)
        else:
            log.warning("native: %s not built (run scripts/setup): the torch fallbacks are used", path)
    return _ext


def env_isa() -> int:
    """The extension's code for ``TGI_ZMQ_ISA`` (auto: the best this CPU has)."""
    isa = os.environ.get("TGI_ZMQ_ISA", "auto").lower()
    if isa not in ISAS:
        raise ValueError(f"TGI_ZMQ_ISA={isa}: choose one of {', '.join(ISAS)}")
    return ISAS[isa]


ISA = env_isa()  # the code path the attention and gemv kernels run (read once, at import)
