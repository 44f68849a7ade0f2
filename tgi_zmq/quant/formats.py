"""The two quantized weight formats every quantized linear is stored in, whatever it came from.

- ``Int8Weight``: signed 8-bit codes with one scale per ``group`` inputs of a row (``group == K``: one
  per output row, as bitsandbytes' LLM.int8 and EETQ; 32: GGUF's Q8_0 and Q5_0; 16: Q6_K's sub-blocks)
  and optionally an offset per group (GGUF's Q5_1 and Q5_K): ``w = q * scale (+ offset)``. GGUF's 5- and
  6-bit codes take a byte each (their bits lie in several planes): one byte a weight was as fast as
  bfloat16 for one row of x where the weights stream from memory (one core, the int8 kernel bound by
  decoding, not bytes), so packing them tighter would save memory, not time.
- ``Int4Weight``: 4-bit codes, two to a byte, with a scale and an offset per ``group`` inputs and a
  16-entry table that gives each code its value: ``w = lut[q] * scale + offset``. The table makes
  one format (and one kernel) of uniform int4 (GGUF Q4_0/Q4_1/Q4_K, GPTQ, AWQ: ``lut = 0..15``) and of
  bitsandbytes' NF4 and FP4 (their code books, offset 0).

``ActOrder`` wraps either with its inputs in another order (a GPTQ act-order checkpoint's).

Within each 32 inputs of a row, byte ``j`` holds input ``j`` in its low nibble and input ``j + 16`` in
its high one (GGML's order): a 16-byte load gives two runs of 16 consecutive inputs, one register
each in AVX-512. A group is a multiple of 32 inputs, but an int8 one without offsets may be 16.

Scales and offsets are float32 (GGUF stores float16: converting is exact). The reference
``dequantize`` defines the numerics the kernels must match.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

BLOCK = 32  # inputs per packed run of nibbles; every group is a multiple of it
UNIFORM = torch.arange(16, dtype=torch.float32)
# bitsandbytes' code books (bitsandbytes.functional.get_4bit_type): NF4 from the normal distribution's
# quantiles, FP4 as e2m1 scaled to [-1, 1]. Indexed by the 4-bit code.
NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
FP4 = (
    torch.tensor(
        [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
    )
    / 12
)


@dataclasses.dataclass
class Int8Weight:
    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float32 [N, K // group]
    group: int
    offsets: torch.Tensor | None = None  # float32 [N, K // group], or None: 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.qweight.shape
        w = self.qweight.float().view(n, k // self.group, self.group) * self.scales.unsqueeze(-1)
        if self.offsets is not None:
            w = w + self.offsets.unsqueeze(-1)
        return w.view(n, k).to(dtype)

    def rows(self, ids: torch.Tensor) -> Int8Weight:
        """The rows ``ids`` (an embedding lookup)."""
        offsets = None if self.offsets is None else self.offsets[ids]
        return Int8Weight(self.qweight[ids], self.scales[ids], self.group, offsets)

    def nbytes(self) -> int:
        return _nbytes(self)


@dataclasses.dataclass
class Int4Weight:
    packed: torch.Tensor  # uint8 [N, K // 2], GGML's nibble order in each run of 32 inputs
    scales: torch.Tensor  # float32 [N, K // group]
    offsets: torch.Tensor  # float32 [N, K // group]
    lut: torch.Tensor  # float32 [16]: the value of each code
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def codes(self) -> torch.Tensor:
        """The 4-bit codes [N, K] as uint8 in input order."""
        n, half = self.packed.shape
        runs = self.packed.view(n, half // 16, 16)
        return torch.cat([runs & 15, runs >> 4], dim=-1).view(n, half * 2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        values = self.lut[self.codes().long()].view(n, k // self.group, self.group)
        w = values * self.scales.unsqueeze(-1) + self.offsets.unsqueeze(-1)
        return w.view(n, k).to(dtype)

    def rows(self, ids: torch.Tensor) -> Int4Weight:
        return Int4Weight(self.packed[ids], self.scales[ids], self.offsets[ids], self.lut, self.group)

    def nbytes(self) -> int:
        return _nbytes(self)


QuantizedWeight = Int8Weight | Int4Weight


class ActOrder(NamedTuple):
    """A GPTQ act-order weight: its inputs sorted by group; the layer reads ``x[:, perm]``."""

    weight: QuantizedWeight
    perm: torch.Tensor


Loaded = QuantizedWeight | ActOrder | torch.Tensor
"""What a checkpoint reader's ``get_quantized`` gives: its own quantized blocks, or a float tensor."""


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (K a multiple of 32, values 0..15) -> uint8 [N, K // 2] in GGML's order."""
    n, k = codes.shape
    runs = codes.to(torch.uint8).view(n, k // BLOCK, 2, 16)
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, k // 2)


def quantize_int8(w: torch.Tensor, group: int | None = None) -> Int8Weight:
    """Symmetric absmax codes in [-127, 127]; ``group`` None: one scale per row."""
    n, k = w.shape
    group = group or k
    wg = w.float().view(n, k // group, group)
    scales = wg.abs().amax(-1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(wg / safe.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.view(n, k), scales.contiguous(), group)


def quantize_int4(w: torch.Tensor, group: int = BLOCK) -> Int4Weight:
    """Uniform asymmetric codes (min..max over 16 levels), as GGUF's Q4_1."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = (hi - lo) / 15
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round((wg - lo.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp(0, 15)
    return Int4Weight(
        pack_codes(codes.view(n, k)), scales.contiguous(), lo.contiguous(), UNIFORM.clone(), group
    )


def quantize_lut4(w: torch.Tensor, lut: torch.Tensor, group: int = 64) -> Int4Weight:
    """bitsandbytes' NF4/FP4: absmax per ``group`` inputs (64, its default block), nearest code."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    absmax = wg.abs().amax(-1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (wg / safe.unsqueeze(-1)).unsqueeze(-1)
    codes = (normed - lut.view(1, 1, 1, 16)).abs().argmin(-1)
    zeros = torch.zeros_like(absmax)
    return Int4Weight(pack_codes(codes.view(n, k)), absmax.contiguous(), zeros, lut.clone(), group)


def to_device(w: QuantizedWeight, device: torch.device | str) -> QuantizedWeight:
    """The same weight with every tensor on ``device``."""
    moved = {f.name: getattr(w, f.name) for f in dataclasses.fields(w)}
    return dataclasses.replace(
        w, **{k: v.to(device) for k, v in moved.items() if isinstance(v, torch.Tensor)}
    )


def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights with the same inputs and format stacked by output rows (q|k|v, gate|up)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    fields = {f.name: getattr(first, f.name) for f in dataclasses.fields(first)}
    for f in dataclasses.fields(first):
        value = fields[f.name]
        if isinstance(value, torch.Tensor) and f.name != "lut":
            fields[f.name] = torch.cat([getattr(p, f.name) for p in parts])
    return type(first)(**fields)


def _nbytes(w: QuantizedWeight) -> int:
    return sum(
        t.numel() * t.element_size()
        for t in (getattr(w, f.name) for f in dataclasses.fields(w))
        if isinstance(t, torch.Tensor)
    )
