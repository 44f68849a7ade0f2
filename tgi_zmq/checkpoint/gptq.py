"""GPTQ and AWQ checkpoints (TGI's ``--quantize gptq`` / ``awq``), repacked at load into ``Int4Weight``.

Both store 4-bit codes eight to an int32 with float16 scales and 4-bit zero points per group of inputs,
``w = (q - z) * s``: our ``lut = 0..15``, ``scale = s``, ``offset = -z * s``. That is exact in float32
(``s`` has 11 significant bits, ``|q - z| <= 15``), so the repacked weight dequantizes to the very
values the checkpoint means. Layouts, K inputs, N outputs, G inputs a group (AutoGPTQ, GPTQModel,
AutoAWQ, TGI):

- GPTQ: ``qweight`` int32 [K/8, N], input ``8r + i`` in bits ``4i..4i+3`` of row ``r``; ``qzeros``
  int32 [K/G, N/8], output ``8c + i`` in nibble ``i`` of column ``c``; ``scales`` [K/G, N]; ``g_idx``
  int32 [K], each input's group. The v1 format (``checkpoint_format: gptq``) stores ``z - 1``:
  GPTQModel writes the packed zeros minus 0x11111111, borrowing across nibbles where ``z = 0``, and
  reads them back by adding it, which we do too (exllama's per-nibble ``z + 1`` agrees wherever no
  zero point is 0). ``gptq_v2`` stores ``z``. With act-order (``desc_act``) the groups are made in a
  permuted order of the inputs, so ``g_idx`` is not ``k // G``.
- AWQ (``version: gemm``): ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [K/G, N/8] packed along N,
  nibble ``i`` of column ``c`` holding output ``8c + AWQ_ORDER[i]``; ``scales`` [K/G, N]; no g_idx.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Hashable
from pathlib import Path

import torch

from tgi_zmq.block_manager import ceil_div
from tgi_zmq.quant.formats import BLOCK, UNIFORM, Int4Weight, pack_codes

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output of nibble i within an AWQ int32
AWQ_UNORDER = tuple(AWQ_ORDER.index(j) for j in range(8))  # the nibble of output j
V1_ZERO_BIAS = 0x11111111  # GPTQ v1 stores the packed zero points minus one per nibble
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # of the eight nibbles in an int32
Range = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's ``quantization_config``; constructing one rejects what we cannot load."""

    method: str  # "gptq" or "awq"
    bits: int = 4
    group_size: int = 128  # -1: one group over all inputs
    desc_act: bool = False  # GPTQ act-order; the repacking goes by g_idx, this only records it
    sym: bool = True
    zero_point: bool = True  # AWQ: asymmetric codes with qzeros (its GEMM format requires them)
    version: str = "gemm"  # AWQ's packing
    checkpoint_format: str = "gptq"  # GPTQ: "gptq" (v1, qzeros hold z - 1) or "gptq_v2" (z)

    def __post_init__(self) -> None:
        name = self.method.upper()
        if self.method not in ("gptq", "awq"):
            raise ValueError(f"quant_method {self.method!r} is not GPTQ or AWQ")
        if self.bits != 4:
            raise ValueError(
                f"{name} checkpoint with {self.bits}-bit weights: only 4-bit {name} is supported"
            )
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % BLOCK):
            raise ValueError(
                f"{name} group_size {self.group_size}: the int4 format needs groups of a multiple of {BLOCK}"
            )
        if self.method == "awq" and self.version.lower() != "gemm":
            raise ValueError(f"AWQ version {self.version!r}: only the 'gemm' packing is supported")
        if self.method == "awq" and not self.zero_point:
            raise ValueError("AWQ with zero_point false: only AWQ with zero points (GEMM) is supported")
        if self.method == "gptq" and self.checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {self.checkpoint_format!r}: only 'gptq' and 'gptq_v2'")

    def group(self, k: int) -> int:
        """Inputs per group of a weight with ``k`` inputs."""
        return k if self.group_size == -1 else self.group_size


def read_quant_config(folder: str | Path) -> QuantConfig | None:
    """The GPTQ/AWQ config of a model folder: config.json's ``quantization_config``, else AutoGPTQ's
    ``quantize_config.json`` or old AutoAWQ's ``quant_config.json``. None without one, or when the
    folder is quantized by another method (bitsandbytes, fp8...), which other loaders handle."""
    folder = Path(folder)
    config = folder / "config.json"
    raw = json.loads(config.read_text()).get("quantization_config") if config.exists() else None
    for name in ("quantize_config.json", "quant_config.json"):
        if raw is None and (folder / name).exists():
            raw = json.loads((folder / name).read_text())
    if raw is None:
        return None
    awq_keys = {"w_bit", "q_group_size", "zero_point", "version"}
    method = str(raw.get("quant_method") or ("awq" if awq_keys & raw.keys() else "gptq")).lower()
    if method not in ("gptq", "awq"):
        return None
    fmt = "marlin" if raw.get("is_marlin_format") else raw.get("checkpoint_format") or raw.get("format")
    return QuantConfig(
        method=method,
        bits=int(raw.get("bits", raw.get("w_bit", 4))),
        group_size=int(raw.get("group_size", raw.get("q_group_size", 128))),
        desc_act=bool(raw.get("desc_act", False)),
        sym=bool(raw.get("sym", method == "gptq")),
        zero_point=bool(raw.get("zero_point", True)),
        version=str(raw.get("version", "gemm")).lower(),
        checkpoint_format=str(fmt or "gptq").lower(),
    )


def gptq_to_int4(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    cfg: QuantConfig,
    rows: Range | None = None,
    cols: Range | None = None,
) -> tuple[Int4Weight, torch.Tensor | None]:
    """A GPTQ linear (or its ``rows`` x ``cols`` slice, for tensor parallelism) as ``Int4Weight``.

    With act-order the inputs are sorted by group, each group then contiguous as our format needs:
    the layer computes ``x[:, perm] @ w.T`` with the returned ``perm`` over the slice's inputs (None
    when they are in order already). Only the packed words covering the slice are unpacked.
    """
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    (r0, r1), (c0, c1) = _check_range(rows, n, "rows"), _check_range(cols, k, "cols")
    if g_idx is None:
        g_idx = torch.arange(k) // cfg.group(k)
    groups = scales.shape[0]
    bad_g_idx = g_idx.shape != (k,) or not 0 <= int(g_idx.min()) <= int(g_idx.max()) < groups
    if bad_g_idx or scales.shape[1] != n or qzeros.shape != (groups, ceil_div(n, 8)):
        raise ValueError(
            f"GPTQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)}"
        )
    codes = _unpack(qweight[_words(c0, c1), r0:r1].T, c0, c1)  # [N', K']
    zeros = qzeros[:, _words(r0, r1)].long()
    if cfg.checkpoint_format == "gptq":
        zeros = (zeros + V1_ZERO_BIAS) & 0xFFFFFFFF
    zeros = _unpack(zeros, r0, r1)  # [groups, N']
    return _assemble(codes, zeros, scales[:, r0:r1], g_idx[c0:c1].long(), cfg, (c0, c1), k)


def int4_layout(cfg: QuantConfig, g_idx: torch.Tensor | None, k: int, cols: Range | None) -> Hashable:
    """What decides whether GPTQ/AWQ linears over the same inputs stack into one ``Int4Weight``: the group
    (run) length and the input order of the ``cols`` slice of a weight with ``k`` inputs, from ``g_idx``
    (None: in order) alone, without unpacking the weight."""
    c0, c1 = _check_range(cols, k, "cols")
    groups = g_idx[c0:c1].long() if g_idx is not None else torch.arange(c0, c1) // cfg.group(k)
    perm, run = _order(groups)
    return run, None if perm is None else perm.numpy().tobytes()


def awq_to_int4(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    cfg: QuantConfig,
    rows: Range | None = None,
    cols: Range | None = None,
) -> Int4Weight:
    """An AWQ (GEMM) linear, or its ``rows`` x ``cols`` slice, as ``Int4Weight``."""
    k, n = qweight.shape[0], scales.shape[1]
    (r0, r1), (c0, c1) = _check_range(rows, n, "rows"), _check_range(cols, k, "cols")
    words = ceil_div(n, 8)
    if qweight.shape[1] != words or qzeros.shape != (scales.shape[0], words):
        raise ValueError(
            f"AWQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}"
        )
    codes = _unpack(qweight[c0:c1, _words(r0, r1)], r0, r1, AWQ_UNORDER).T  # [N', K']
    zeros = _unpack(qzeros[:, _words(r0, r1)], r0, r1, AWQ_UNORDER)
    groups = torch.arange(c0, c1) // cfg.group(k)
    weight, _ = _assemble(codes, zeros, scales[:, r0:r1], groups, cfg, (c0, c1), k)
    return weight


def _check_range(span: Range | None, size: int, what: str) -> Range:
    lo, hi = span or (0, size)
    if not 0 <= lo < hi <= size:
        raise ValueError(f"{what} [{lo}, {hi}) is not a slice of {size}")
    return lo, hi


def _words(lo: int, hi: int) -> slice:
    """The packed int32 words holding the values [lo, hi)."""
    return slice(lo // 8, ceil_div(hi, 8))


def _unpack(packed: torch.Tensor, lo: int, hi: int, nibble_of: tuple[int, ...] | None = None) -> torch.Tensor:
    """The 4-bit values [lo, hi) along the last dim of ``packed`` (the words ``_words(lo, hi)``) as
    uint8; ``nibble_of[j]``: the nibble holding value ``j`` of each word (default ``j``)."""
    nibbles = ((packed.unsqueeze(-1) >> SHIFTS) & 15).to(torch.uint8)  # [..., words, 8]
    if nibble_of is not None:
        nibbles = nibbles[..., list(nibble_of)]
    start = lo - lo // 8 * 8
    return nibbles.flatten(-2)[..., start : start + hi - lo]


def _assemble(
    codes: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    groups: torch.Tensor,
    cfg: QuantConfig,
    cols: Range,
    k: int,
) -> tuple[Int4Weight, torch.Tensor | None]:
    """Codes [N', K'], per-group zero points and scales [groups, N'] and each input's group [K'] as
    ``Int4Weight``, inputs sorted by group when they are not already (act-order).

    Each group's inputs must come in runs of a multiple of 32: the format's group is the largest run
    length dividing them all (a slice cutting a group leaves shorter runs, whose scales are repeated).
    """
    perm, run = _order(groups)
    if perm is not None:
        codes, groups = codes[:, perm], groups[perm]
    if run % BLOCK:
        name, group = cfg.method.upper(), cfg.group(k)
        if cols == (0, k):
            raise ValueError(
                f"{name} weight of {k} inputs in groups of {group}: the int4 format needs groups "
                f"of a multiple of {BLOCK} inputs"
            )
        raise ValueError(
            f"{name} inputs [{cols[0]}, {cols[1]}) of {k} cut its groups of {group} into runs of "
            f"{run}: the int4 format needs multiples of {BLOCK}; split at group boundaries"
        )
    run_groups = groups[::run]
    s = scales[run_groups].float().T.contiguous()
    offsets = -zeros[run_groups].float().T * s
    return Int4Weight(pack_codes(codes.contiguous()), s, offsets.contiguous(), UNIFORM.clone(), run), perm


def _order(groups: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Each input's group -> (the inputs sorted by group, None when they are already; the largest run
    length dividing every group's count of inputs)."""
    perm = torch.argsort(groups, stable=True) if bool((groups[1:] < groups[:-1]).any()) else None
    _, counts = torch.unique_consecutive(groups if perm is None else groups[perm], return_counts=True)
    return perm, functools.reduce(math.gcd, counts.tolist())
