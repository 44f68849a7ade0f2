"""GPTQ and AWQ checkpoints made from the tiny float models (``pack_gptq``, ``pack_awq``: a float weight as
the tensors the real tools write), and their dequantized float references.

The quantized folder is what the real tools write (safetensors tensors ``<prefix>.qweight`` ... and
``quantization_config`` in config.json, or AutoGPTQ's ``quantize_config.json``); the reference folder
is the float32 model whose decoder linears are exactly the weights the checkpoint means, for
token-for-token comparisons against transformers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tgi_zmq.checkpoint.gptq import (
    AWQ_ORDER,
    SHIFTS,
    V1_ZERO_BIAS,
    QuantConfig,
    awq_to_int4,
    gptq_to_int4,
    read_quant_config,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INDEX_FILE = "model.safetensors.index.json"
QUANT_FILES = ("quantize_config.json", "quant_config.json")


def is_decoder_linear(name: str) -> bool:
    parts = name.split(".")
    return "layers" in parts and parts[-1] == "weight" and parts[-2] in LINEARS


def write_gptq_checkpoint(
    float_folder: Path,
    out_folder: Path,
    group: int = 32,
    desc_act: bool = False,
    sym: bool = False,
    legacy_config: bool = False,
) -> Path:
    """``float_folder`` with every decoder linear GPTQ-quantized (v1 format, as AutoGPTQ/optimum write).

    ``legacy_config``: the config in AutoGPTQ's ``quantize_config.json`` instead of config.json.
    """
    config = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group,
        "desc_act": desc_act,
        "sym": sym,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.1,
        "checkpoint_format": "gptq",
    }
    seeds = iter(range(1_000_000))

    def pack(w: torch.Tensor) -> dict[str, torch.Tensor]:
        return pack_gptq(w, group, desc_act=desc_act, seed=next(seeds), sym=sym)

    return _write(
        float_folder, Path(out_folder), pack, config, "quantize_config.json" if legacy_config else None
    )


def write_awq_checkpoint(float_folder: Path, out_folder: Path, group: int = 32) -> Path:
    """``float_folder`` with every decoder linear AWQ-quantized (GEMM), config as AutoAWQ writes it."""
    config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    config["modules_to_not_convert"] = None
    return _write(float_folder, Path(out_folder), lambda w: pack_awq(w, group), config, None)


def write_dequantized_reference(quant_folder: Path, out_folder: Path) -> Path:
    """The float32 model ``quant_folder`` means: linears dequantized, act-order undone, no quant config."""
    quant_folder, out_folder = Path(quant_folder), Path(out_folder)
    cfg = read_quant_config(quant_folder)
    assert cfg is not None, f"{quant_folder} holds no GPTQ/AWQ config"
    shutil.copytree(quant_folder, out_folder, dirs_exist_ok=True)
    for name in QUANT_FILES:
        (out_folder / name).unlink(missing_ok=True)
    config = json.loads((out_folder / "config.json").read_text())
    config.pop("quantization_config", None)
    (out_folder / "config.json").write_text(json.dumps(config, indent=2))
    _rewrite_tensors(out_folder, lambda tensors: _dequantize_all(tensors, cfg))
    return out_folder


def dequantize(tensors: dict[str, torch.Tensor], prefix: str, cfg: QuantConfig) -> torch.Tensor:
    """The float32 weight [N, K] of the quantized linear ``prefix``, in its original input order."""
    qweight, qzeros, scales = (tensors[f"{prefix}.{t}"] for t in ("qweight", "qzeros", "scales"))
    if cfg.method == "awq":
        return awq_to_int4(qweight, qzeros, scales, cfg).dequantize()
    weight, perm = gptq_to_int4(qweight, qzeros, scales, tensors[f"{prefix}.g_idx"], cfg)
    w = weight.dequantize()
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[:, perm] = w  # x[:, perm] @ w.T == x @ out.T
    return out


def pack_gptq(
    w: torch.Tensor,
    group: int = 128,
    desc_act: bool = False,
    seed: int = 0,
    sym: bool = False,
    v2: bool = False,
) -> dict[str, torch.Tensor]:
    """A float weight [N, K] as a GPTQ checkpoint's tensors (round to nearest, GPTQ's min/max grid).

    ``desc_act`` groups the inputs in a random order, as act-order does (its order is by the Hessian's
    diagonal): ``g_idx[order[j]] = j // group``. ``v2``: qzeros hold z (``gptq_v2``), else z - 1.
    """
    n, k = w.shape
    g = k if group == -1 else group
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if desc_act else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[order] = torch.arange(k) // g
    codes, zeros, scales = _quantize(w.float(), g_idx, sym)
    packed_zeros = _pack(zeros.T)
    if not v2:
        packed_zeros = (packed_zeros - V1_ZERO_BIAS) & 0xFFFFFFFF
    return {
        "qweight": _int32(_pack(codes).T.contiguous()),
        "qzeros": _int32(packed_zeros),
        "scales": scales.T.contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }


def pack_awq(w: torch.Tensor, group: int = 128) -> dict[str, torch.Tensor]:
    """A float weight [N, K] as an AWQ (GEMM) checkpoint's tensors (round to nearest, asymmetric)."""
    n, k = w.shape
    codes, zeros, scales = _quantize(w.float(), torch.arange(k) // group, sym=False)
    return {
        "qweight": _int32(_pack(codes.T.contiguous(), AWQ_ORDER)),
        "qzeros": _int32(_pack(zeros.T.contiguous(), AWQ_ORDER)),
        "scales": scales.T.contiguous(),
    }


def _pack(values: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """4-bit values [..., 8M] -> [..., M] words as int64 in [0, 2^32): nibble ``i`` of word ``c`` holds
    value ``8c + order[i]`` (default ``i``)."""
    words = values.long().reshape(*values.shape[:-1], -1, 8)
    if order is not None:
        words = words[..., list(order)]
    return (words << SHIFTS).sum(-1)


def _int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the int32 with the same bits (what checkpoints store)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _quantize(w: torch.Tensor, g_idx: torch.Tensor, sym: bool) -> tuple[torch.Tensor, ...]:
    """GPTQ's round-to-nearest grid per (row, group): min/max widened to include 0, float16 scales.
    Returns codes [N, K], zero points [N, groups] (both int64) and scales [N, groups] (float16)."""
    n, k = w.shape
    idx, groups = g_idx.expand(n, k), int(g_idx.max()) + 1
    lo = torch.zeros(n, groups).scatter_reduce(1, idx, w, "amin")  # include_self: the 0
    hi = torch.zeros(n, groups).scatter_reduce(1, idx, w, "amax")
    if sym:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    scales = ((hi - lo) / 15).half()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    s = scales.float()
    zeros = torch.full_like(s, 8) if sym else torch.round(-lo / s).clamp(0, 15)
    codes = torch.round(w / s[:, g_idx]) + zeros[:, g_idx]
    return codes.clamp(0, 15).long(), zeros.long(), scales


def _write(
    float_folder: Path,
    out_folder: Path,
    pack: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    quant_config: dict,
    config_file: str | None,
) -> Path:
    shutil.copytree(float_folder, out_folder, dirs_exist_ok=True)
    if config_file is None:
        config = json.loads((out_folder / "config.json").read_text())
        config["quantization_config"] = quant_config
        (out_folder / "config.json").write_text(json.dumps(config, indent=2))
    else:
        (out_folder / config_file).write_text(json.dumps(quant_config, indent=2))

    def quantize(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in tensors.items():
            if is_decoder_linear(name):
                prefix = name.removesuffix(".weight")
                out.update({f"{prefix}.{key}": value for key, value in pack(tensor).items()})
            else:
                out[name] = tensor
        return out

    _rewrite_tensors(out_folder, quantize)
    return out_folder


def _dequantize_all(tensors: dict[str, torch.Tensor], cfg: QuantConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        prefix, _, kind = name.rpartition(".")
        if kind == "qweight":
            out[f"{prefix}.weight"] = dequantize(tensors, prefix, cfg)
        elif kind not in ("qzeros", "scales", "g_idx"):
            out[name] = tensor
    return out


def _rewrite_tensors(
    folder: Path, rewrite: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
) -> None:
    """Rewrite every safetensors file of ``folder`` in place (a linear's tensors stay in its file),
    keeping the shard index's map of names to files in step."""
    weight_map = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors = rewrite(load_file(path))
        save_file(tensors, path, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, path.name))
    index = folder / INDEX_FILE
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = weight_map
        index.write_text(json.dumps(data, indent=2))
