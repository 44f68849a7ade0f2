"""The linear methods of quantized weights (``tgi_zmq.layers.LinearMethod``), and which one serves each
layer (``QuantScheme``).

- ``QuantizedLinear``: our two formats on any device (the CPU kernels of ``kernels``; elsewhere the
  weight is dequantized per call). A float checkpoint is quantized at load, slice by slice; a GGUF
  or GPTQ/AWQ checkpoint hands over its own blocks, repacked (``WeightSource.get_quantized``).
- ``DequantizedLinear``: one dense weight from parts that do not stack into one quantized weight.
- ``BitsAndBytesLinear``: bitsandbytes' own 8-bit and 4-bit layers on CUDA (TGI's numerics).
- ``Fp8Linear``: float8_e4m3fn weights with a scale per output row, on CUDA.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from tgi_zmq.layers import Linear, LinearMethod, Range, UnquantizedLinear, WeightSource, dense_linear
from tgi_zmq.quant import kernels
from tgi_zmq.quant.formats import (
    BLOCK,
    FP4,
    NF4,
    ActOrder,
    Int4Weight,
    Loaded,
    QuantizedWeight,
    cat_rows,
    quantize_int8,
    quantize_lut4,
)

log = logging.getLogger(__name__)
Quantizer = Callable[[torch.Tensor], QuantizedWeight]
QUANTIZED_AT_LOAD = ("int8", "nf4", "fp4")  # the storages a float checkpoint is quantized into


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """Which method serves each linear layer, decided here alone (vLLM's ``QuantizationConfig``).

    ``storage``: a ``--quantize`` mode's (``tgi_zmq.quant.Mode``), ``"checkpoint"`` for a checkpoint
    served in its own quantized blocks (GGUF, GPTQ/AWQ), None for float weights; ``device``: its type.
    """

    storage: str | None
    device: str

    def __post_init__(self) -> None:
        if self.storage not in (None, "checkpoint", "fp8", *QUANTIZED_AT_LOAD):
            raise ValueError(f"no linear method stores weights as {self.storage!r}")

    def method(
        self, prefix: str, stored: Sequence[Hashable | None], in_features: Callable[[], int], head: bool
    ) -> LinearMethod:
        """The method of the linear ``prefix`` (its first part) whose parts the checkpoint stores as
        ``stored`` (None: float; parts stored alike stack into one quantized weight), reading
        ``in_features()`` inputs (asked only to quantize at load); ``head``: the LM head's, 8-bit whenever
        the body is quantized on the CPU (4-bit logits lose too much, as llama.cpp keeps its output
        tensor wider)."""
        if self.storage is None:
            return UnquantizedLinear()
        if self.storage == "checkpoint":
            if stored[0] is not None and all(s == stored[0] for s in stored):
                return QuantizedLinear(None)
            if any(s is not None for s in stored):
                log.debug("%s: parts in different formats or orders: served dense", prefix)
            return DequantizedLinear()
        if self.storage == "fp8":
            return Fp8Linear()
        if self.device == "cuda":
            return BitsAndBytesLinear(self.storage)
        if in_features() % BLOCK:  # our formats hold runs of 32 inputs
            return DequantizedLinear()
        if head and self.device == "cpu":
            return QuantizedLinear(quantize_int8)
        return QuantizedLinear(quantizer(self.storage))


def quantizer(storage: str) -> Quantizer | None:
    """How a float weight is quantized at load for ``storage`` (None: kept as the checkpoint has it)."""
    if storage == "int8":
        return quantize_int8
    if storage in ("nf4", "fp4"):
        lut = NF4 if storage == "nf4" else FP4
        return lambda w: quantize_lut4(w, lut) if w.shape[1] % 64 == 0 else quantize_int8(w)
    return None


class QuantizedLinear:
    """Our formats: the parts stacked in one quantized weight. ``quantize``: applied to float parts
    (None: the checkpoint's own blocks, which ``QuantScheme`` checked stack)."""

    def __init__(self, quantize: Quantizer | None):
        self.quantize = quantize

    def load(
        self, layer: Linear, weights: WeightSource, parts: Sequence[tuple[str, Range]], cols: Range
    ) -> None:
        loaded = [self._quantized(weights.get_quantized(f"{p}.weight", rows, cols)) for p, rows in parts]
        perms = [w.perm for w in loaded if isinstance(w, ActOrder)]
        quantized = [w.weight if isinstance(w, ActOrder) else w for w in loaded]
        same_order = not perms or (len(perms) == len(loaded) and all(torch.equal(p, perms[0]) for p in perms))
        if not (_one_format(quantized) and same_order):  # a wrong answer is worse than an error
            raise ValueError(f"{parts[0][0]}: parts in different formats or input orders do not stack")
        layer.perm = perms[0] if perms else None
        layer.qweight = kernels.prepare(cat_rows(quantized))

    def _quantized(self, w: Loaded) -> Loaded:
        return self.quantize(w.float()) if isinstance(w, torch.Tensor) and self.quantize is not None else w

    def apply(self, layer: Linear, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        if layer.perm is not None:
            x = x[..., layer.perm]
        return kernels.linear(x, layer.qweight, layer.bias, float_out)


class DequantizedLinear:
    """One dense weight in the model's dtype from parts that do not stack into one quantized weight:
    float ones, or a mix (a GGUF's Q4_K q/k beside a Q6_K v, GPTQ parts in different act-orders)."""

    def load(
        self, layer: Linear, weights: WeightSource, parts: Sequence[tuple[str, Range]], cols: Range
    ) -> None:
        loaded = [_float(weights.get_quantized(f"{p}.weight", rows, cols)) for p, rows in parts]
        weight = torch.cat(loaded) if len(loaded) > 1 else loaded[0]
        layer.weight = weight.to(weights.dtype)

    def apply(self, layer: Linear, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        return dense_linear(x, layer.weight, layer.bias, float_out)


class BitsAndBytesLinear:
    """bitsandbytes' ``Linear8bitLt`` (outlier threshold 6.0, as TGI) or ``Linear4bit`` (nf4/fp4)."""

    def __init__(self, storage: str):
        self.storage = storage

    def load(
        self, layer: Linear, weights: WeightSource, parts: Sequence[tuple[str, Range]], cols: Range
    ) -> None:
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

    def apply(self, layer: Linear, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        y = layer.module(x).to(x.dtype)
        y = y if layer.bias is None else y + layer.bias
        return y.float() if float_out else y


class Fp8Linear:
    """float8_e4m3fn weights, one float32 scale per output row, dequantized in the matmul's dtype."""

    def load(
        self, layer: Linear, weights: WeightSource, parts: Sequence[tuple[str, Range]], cols: Range
    ) -> None:
        w = torch.cat([weights.get(f"{p}.weight", rows, cols, torch.float32) for p, rows in parts])
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
        layer.fp8, layer.scale = (w / scale).to(torch.float8_e4m3fn), scale

    def apply(self, layer: Linear, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        return dense_linear(x, (layer.fp8.to(x.dtype) * layer.scale.to(x.dtype)), layer.bias, float_out)


def _one_format(parts: list[QuantizedWeight | torch.Tensor]) -> bool:
    """All quantized alike: the same format, group, code table and offsets or none (so they stack)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return False
    return all(
        type(w) is type(first)
        and w.group == first.group
        and (w.offsets is None) == (first.offsets is None)
        and (not isinstance(w, Int4Weight) or torch.equal(w.lut, first.lut))
        for w in parts
    )


def _float(w: Loaded) -> torch.Tensor:
    if isinstance(w, ActOrder):
        return w.weight.dequantize()[:, torch.argsort(w.perm)]
    return w if isinstance(w, torch.Tensor) else w.dequantize()
