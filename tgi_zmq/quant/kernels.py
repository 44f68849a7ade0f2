"""Matmuls with quantized weights: ``linear(x, prepare(w), bias)`` = ``x @ w.dequantize().T + bias`` in
``x``'s dtype, by the kernel measured fastest on this CPU for the weight's format and ``x``'s rows.

Kernels:
- ``fused``: our C++ extension (``csrc/qkernels.cpp``) reads the stored codes (1 or 0.5 byte a weight)
  and dequantizes them in registers, float32 FMAs, AVX-512 or AVX2 picked at run time. Small M
  (decode) is bound by weight bytes, where this beats a float32 matmul.
- ``dequant``: the extension dequantizes into a reused scratch buffer in ``x``'s dtype (rows at a
  time), then a dense matmul: large M (prefill) is bound by FLOPs, where BLAS's blocking wins.
- ``reference``: ``w.dequantize()`` then ``F.linear``: always works (no extension, other devices,
  shapes the extension refuses: K not a multiple of 32, a group not a multiple of 32 but int8's 16).

``RULES`` picks per (torch's CPU capability, format, x's dtype, M); it is written from ``scripts/qbench``
runs (docs/quantization.md, ``## Kernels``), not measured at each start. Environment:
``TGI_ZMQ_QKERNEL=fused|dequant|reference`` forces one kernel for every M; ``TGI_ZMQ_ISA=avx2|scalar``
caps the extension's code path (to measure AVX2 on an AVX-512 machine). Both are read by ``prepare``.

The extension is ``tgi_zmq.native`` (compiled by ``scripts/setup`` or ``tgi-zmq launch``; missing or
broken, a warning and the reference kernel). Memory: the prepared weight is the quantized one (same
tensors), plus one dequant buffer per thread and dtype of at most SCRATCH_ELEMENTS.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading

import torch
import torch.nn.functional as F

from tgi_zmq import native
from tgi_zmq.native import env_isa, extension
from tgi_zmq.quant.formats import BLOCK, Int4Weight, Int8Weight, QuantizedWeight

log = logging.getLogger(__name__)

KERNELS = ("fused", "dequant", "reference")
SCRATCH_ELEMENTS = 1 << 22  # the dequant kernel's buffer: 16 MB float32, so at most that many weights a pass

# (torch CPU capability, format, x's dtype) -> (largest M, kernel) ranges, first match wins. Written from
# scripts/qbench runs (docs/quantization.md, "## Kernels"): fused wins while the weight bytes dominate,
# dequant + dense matmul once M rows of FLOPs amortise the dequantization. How soon depends on the dense
# matmul in x's dtype: bfloat16 is 2-4x float32 with AVX-512 bf16 (crossover M ~16), float32 on AVX2
# crosses at M 16-32, and bfloat16 without AVX-512 bf16 is so slow that fused always wins.
Ranges = tuple[tuple[float, str], ...]
FUSED: Ranges = ((math.inf, "fused"),)
RULES: dict[tuple[str, str, torch.dtype], Ranges] = {
    ("AVX512", "int8", torch.bfloat16): ((16, "fused"), (math.inf, "dequant")),
    ("AVX512", "int4", torch.bfloat16): ((8, "fused"), (math.inf, "dequant")),
    ("AVX512", "int8", torch.float32): ((128, "fused"), (math.inf, "dequant")),
    ("AVX512", "int4", torch.float32): ((128, "fused"), (math.inf, "dequant")),
    ("AVX2", "int8", torch.float32): ((32, "fused"), (math.inf, "dequant")),
    ("AVX2", "int4", torch.float32): ((16, "fused"), (math.inf, "dequant")),
    ("AVX2", "int8", torch.bfloat16): FUSED,
    ("AVX2", "int4", torch.bfloat16): FUSED,
}
# Another capability (DEFAULT, a newer torch's name) reads AVX2's rows; another dtype (float16) is fused.
CAPABILITY = torch.backends.cpu.get_cpu_capability()
RULE_CAPABILITY = CAPABILITY if any(key[0] == CAPABILITY for key in RULES) else "AVX2"

_scratch = threading.local()


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A weight as its kernels read it: the stored codes (the extension's layout is the format's own,
    so nothing is copied), and how its kernel is chosen."""

    weight: QuantizedWeight
    forced: str | None  # one kernel for every call (TGI_ZMQ_QKERNEL; reference without the extension)
    isa: int  # the extension's code path (ISAS)

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @property
    def format(self) -> str:
        return "int8" if isinstance(self.weight, Int8Weight) else "int4"

    def kernel(self, m: int, dtype: torch.dtype) -> str:
        """The kernel for ``m`` rows of x in ``dtype``."""
        if self.forced:
            return self.forced
        if native.INVARIANT:  # the fused kernel reduces each row alike whatever M; BLAS does not
            return "fused"
        ranges = RULES.get((RULE_CAPABILITY, self.format, dtype), FUSED)
        return next(kernel for top, kernel in ranges if m <= top)


def prepare(w: QuantizedWeight) -> Prepared:
    """At load: contiguous float32 scales and codes, and the kernels for this CPU (or the forced one)."""
    if isinstance(w, Int8Weight):
        offsets = None if w.offsets is None else w.offsets.float().contiguous()
        w = Int8Weight(w.qweight.contiguous(), w.scales.float().contiguous(), w.group, offsets)
    else:
        scales, offsets, lut = (t.float().contiguous() for t in (w.scales, w.offsets, w.lut))
        w = Int4Weight(w.packed.contiguous(), scales, offsets, lut, w.group)
    return Prepared(w, _forced(w), env_isa())


def linear(
    x: torch.Tensor, prepared: Prepared, bias: torch.Tensor | None = None, float_out: bool = False
) -> torch.Tensor:
    """``x @ W^T + bias`` for x [..., K], in x's dtype (``float_out``: float32, the fused kernel's own
    sums unrounded)."""
    n, k = prepared.shape
    x2 = x.reshape(-1, k)
    kernel = prepared.kernel(x2.shape[0], x.dtype) if x.device.type == "cpu" else "reference"
    if kernel == "dequant" and x.dtype not in (torch.float32, torch.bfloat16):
        kernel = "fused"  # the scratch buffer is float32 or bfloat16
    y = _KERNEL_FNS[kernel](x2, prepared, bias, float_out)
    return y.view(*x.shape[:-1], n)


def backend() -> str:
    """What this CPU runs, for logs and /info, e.g. 'qkernels avx512, torch AVX512: int8 bfloat16: fused
    M<=8, dequant above; ...'."""
    ext = extension()
    if ext is None:
        return "reference (dequantize + F.linear): the qkernels extension is not built or does not load"
    head = f"qkernels {ext.isa_name(env_isa())}, torch {CAPABILITY}"
    if forced := os.environ.get("TGI_ZMQ_QKERNEL"):
        return f"{head}: {forced} (TGI_ZMQ_QKERNEL)"
    rules = [
        f"{fmt} {str(dtype)[6:]}: " + ", ".join(_describe(ranges))
        for (cap, fmt, dtype), ranges in RULES.items()
        if cap == RULE_CAPABILITY
    ]
    return f"{head}: " + "; ".join(rules)


# ---- kernels -------------------------------------------------------------------------------------------


def _args(w: QuantizedWeight) -> tuple:
    """The extension's weight arguments: codes, scales, offsets (or None), lut (int8: None), group."""
    if isinstance(w, Int8Weight):
        return w.qweight, w.scales, w.offsets, None, w.group
    return w.packed, w.scales, w.offsets, w.lut, w.group


def _fused(x: torch.Tensor, p: Prepared, bias: torch.Tensor | None, float_out: bool) -> torch.Tensor:
    return extension().linear(x, *_args(p.weight), bias, p.isa, native.INVARIANT, float_out)


def _dequant(x: torch.Tensor, p: Prepared, bias: torch.Tensor | None, float_out: bool) -> torch.Tensor:
    """Dequantize up to SCRATCH_ELEMENTS weights at a time into one reused buffer (a fresh one per call
    would page-fault its every page), then BLAS: for large M the matmul dominates."""
    n, k = p.shape
    rows = max(1, min(n, SCRATCH_ELEMENTS // k))
    buf = _scratch_buffer(rows * k, x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    codes, scales, offsets, lut, group = _args(p.weight)
    ext = extension()
    outs = []
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        w = buf[: (hi - lo) * k].view(hi - lo, k)
        ext.dequantize(
            codes[lo:hi], scales[lo:hi], None if offsets is None else offsets[lo:hi], lut, group, w, p.isa
        )
        outs.append(F.linear(x, w, None if bias is None else bias[lo:hi]))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return y.float() if float_out else y


def _reference(x: torch.Tensor, p: Prepared, bias: torch.Tensor | None, float_out: bool) -> torch.Tensor:
    w = p.weight.dequantize(x.dtype).to(x.device)
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return y.float() if float_out else y


_KERNEL_FNS = {"fused": _fused, "dequant": _dequant, "reference": _reference}


def _scratch_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The dequant kernel's buffer of this thread and dtype, grown to the largest request."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf


def _forced(w: QuantizedWeight) -> str | None:
    """TGI_ZMQ_QKERNEL's kernel, or reference when the extension is missing or refuses the weight (off
    the CPU; K not a multiple of 32, the group neither that nor 16 of int8 codes without offsets); None:
    RULES choose per call."""
    n, k = w.shape
    half = isinstance(w, Int8Weight) and w.group == BLOCK // 2 and w.offsets is None
    usable = (
        extension() is not None
        and w.scales.device.type == "cpu"
        and k % BLOCK == 0
        and (w.group % BLOCK == 0 or half)
    )
    forced = os.environ.get("TGI_ZMQ_QKERNEL")
    if forced and forced not in KERNELS:
        raise ValueError(f"TGI_ZMQ_QKERNEL={forced}: choose one of {', '.join(KERNELS)}")
    return forced if usable else "reference"


def _describe(ranges: Ranges) -> list[str]:
    return [f"{kernel} above" if top == math.inf else f"{kernel} M<={int(top)}" for top, kernel in ranges]
