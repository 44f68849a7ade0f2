"""The linear methods of quantized weights (``tgi_zmq.layers.LinearMethod``): one per storage.

- ``QuantizedLinear``: our two formats on any device (the CPU kernels of ``kernels``; elsewhere the
  weight is dequantized per call). A float checkpoint is quantized at load, slice by slice; a GGUF
  or GPTQ/AWQ checkpoint hands over its own blocks, repacked (``Weights.get_quantized``).
- ``BitsAndBytesLinear``: bitsandbytes' own 8-bit and 4-bit layers on CUDA (TGI's numerics).
- ``Fp8Linear``: float8_e4m3fn weights with a scale per output row, on CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from tgi_zmq.quant import kernels
from tgi_zmq.quant.formats import (
    BLOCK,
    FP4,
    NF4,
    Int4Weight,
    QuantizedWeight,
    cat_rows,
    quantize_int8,
    quantize_lut4,
)

if TYPE_CHECKING:
    from tgi_zmq.layers import Linear, LinearMethod, Range
    from tgi_zmq.models.weights import Weights

log = logging.getLogger(__name__)
Quantizer = Callable[[torch.Tensor], QuantizedWeight]


class ActOrder(NamedTuple):
    """A GPTQ act-order weight: its inputs sorted by group; the layer reads ``x[:, perm]``."""

    weight: QuantizedWeight
    perm: torch.Tensor


Loaded = QuantizedWeight | ActOrder | torch.Tensor
"""What ``Weights.get_quantized`` gives: the checkpoint's own quantized blocks, or a float tensor."""


def quantizer(storage: str) -> Quantizer | None:
    """How a float weight is quantized at load for ``storage`` (None: kept as the checkpoint has it)."""
    if storage == "int8":
        return quantize_int8
    if storage in ("nf4", "fp4"):
        lut = NF4 if storage == "nf4" else FP4
        return lambda w: quantize_lut4(w, lut) if w.shape[1] % 64 == 0 else quantize_int8(w)
    return None


class QuantizedLinear:
    """Our formats. ``quantize``: applied to float weights (None: float weights stay dense)."""

    def __init__(self, quantize: Quantizer | None):
        self.quantize = quantize

    def load(self, layer: Linear, weights: Weights, parts: Sequence[tuple[str, Range]], cols: Range) -> None:
        """Parts stacked in one quantized weight when they share its format (and act-order); else
        dense: float parts, or a mix (a GGUF's Q4_K q/k beside a Q6_K v) dequantized."""
        loaded = [self._quantized(weights.get_quantized(f"{p}.weight", rows, cols)) for p, rows in parts]
        layer.weight, layer.perm = None, None
        perms = [w.perm for w in loaded if isinstance(w, ActOrder)]
        quantized = [w.weight if isinstance(w, ActOrder) else w for w in loaded]
        same_order = not perms or (len(perms) == len(loaded) and all(torch.equal(p, perms[0]) for p in perms))
        if not (_one_format(quantized) and same_order):
            if any(not isinstance(w, torch.Tensor) for w in loaded):
                log.debug("%s: parts in different formats or orders: served dense", parts[0][0])
            layer.weight = _dense([_float(w) for w in loaded], weights.dtype)
            return
        layer.perm = perms[0] if perms else None
        layer.qweight = kernels.prepare(cat_rows(quantized))

    def _quantized(self, w: Loaded) -> Loaded:
        if isinstance(w, torch.Tensor) and self.quantize is not None and w.shape[1] % BLOCK == 0:
            return self.quantize(w.float())
        return w

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.weight is not None:
            return F.linear(x, layer.weight, layer.bias)
        if layer.perm is not None:
            x = x[..., layer.perm]
        return kernels.linear(x, layer.qweight, layer.bias)


class BitsAndBytesLinear:
    """bitsandbytes' ``Linear8bitLt`` (outlier threshold 6.0, as TGI) or ``Linear4bit`` (nf4/fp4)."""

    def __init__(self, storage: str):
        self.storage = storage

    def load(self, layer: Linear, weights: Weights, parts: Sequence[tuple[str, Range]], cols: Range) -> None:
        import bitsandbytes as bnb

        w = torch.cat([weights.get(f"{p}.weight", rows, cols, torch.float16).cpu() for p, rows in parts])
        out_features, in_features = w.shape
        if self.storage == "int8":
            module: Any = bnb.nn.Linear8bitLt(
                in_features, out_features, bias=False, has_fp16_weights=False, threshold=6.0
            )
            module.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            module = bnb.nn.Linear4bit(
                in_features, out_features, bias=False, compute_dtype=weights.dtype, quant_type=self.storage
            )
            module.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=self.storage)
        layer.module = module.to(weights.device)  # bitsandbytes quantizes as the weight moves to the GPU

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        y = layer.module(x).to(x.dtype)
        return y if layer.bias is None else y + layer.bias


class Fp8Linear:
    """float8_e4m3fn weights, one float32 scale per output row, dequantized in the matmul's dtype."""

    def load(self, layer: Linear, weights: Weights, parts: Sequence[tuple[str, Range]], cols: Range) -> None:
        w = torch.cat([weights.get(f"{p}.weight", rows, cols, torch.float32) for p, rows in parts])
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
        layer.fp8, layer.scale = (w / scale).to(torch.float8_e4m3fn), scale

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, (layer.fp8.to(x.dtype) * layer.scale.to(x.dtype)), layer.bias)


def linear_method(storage: str | None, device: str) -> LinearMethod:
    """The method of every linear of a model served with ``storage`` (``Mode.storage``; None: float)."""
    if storage == "fp8":
        return Fp8Linear()
    if device == "cuda" and storage in ("int8", "nf4", "fp4"):
        return BitsAndBytesLinear(storage)
    return QuantizedLinear(quantizer(storage or ""))


def head_method(storage: str | None, device: str) -> LinearMethod:
    """The LM head's: 8-bit whenever the body is quantized on the CPU (4-bit logits lose too much, as
    llama.cpp keeps its output tensor wider); a GGUF checkpoint's head stays as the file has it."""
    if storage in ("int8", "nf4", "fp4") and device == "cpu":
        return QuantizedLinear(quantize_int8)
    return linear_method(storage, device)


def _one_format(parts: list[QuantizedWeight | torch.Tensor]) -> bool:
    """All quantized alike: the same format, group and code table (so they stack into one)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return False
    return all(
        type(w) is type(first)
        and w.group == first.group
        and (not isinstance(w, Int4Weight) or torch.equal(w.lut, first.lut))
        for w in parts
    )


def _float(w: Loaded) -> torch.Tensor:
    if isinstance(w, ActOrder):
        return w.weight.dequantize()[:, torch.argsort(w.perm)]
    return w if isinstance(w, torch.Tensor) else w.dequantize()


def _dense(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts).to(dtype) if len(parts) > 1 else parts[0].to(dtype)
