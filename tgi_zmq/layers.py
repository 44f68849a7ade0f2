"""Layers that load their own tensor-parallel slice of a checkpoint: the seam between the models and
how weights are stored and split.

A model declares its layers by checkpoint name; each layer reads the rows or columns its rank holds
through ``WeightSource`` and owns the communication its split needs (Megatron's, see ``tgi_zmq.parallel``):
- column-parallel linears hold a range of output features (heads, MLP units) and need none: their
  consumer works on the same range;
- a row-parallel linear holds the matching range of input features, and one all-reduce sums the
  ranks' partial outputs; its bias is added once, so only rank 0 holds it;
- the embedding and the LM head hold a range of the vocabulary (lookups all-reduced, logits gathered
  on rank 0).
With one rank every slice is the whole tensor and nothing communicates.

Both sides of the seam are declared here: a layer reads from a ``WeightSource`` (a checkpoint reader of
``tgi_zmq.checkpoint``) and its weights are made and multiplied by the ``LinearMethod`` the source picks
for it by name (``tgi_zmq.quant.linear``): a quantized format or a LoRA delta is one new method class,
not an edit of every model. Declared beside the layers that consume them, the readers and methods import
this module and it imports neither.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from tgi_zmq import native
from tgi_zmq.machine import cpu_has_bf16
from tgi_zmq.parallel import Shard
from tgi_zmq.quant.formats import Loaded

Range = tuple[int, int] | None
"""Rows (or columns) ``[lo, hi)`` of a checkpoint tensor; None: all of them (one rank)."""

Units = int | tuple[int, int]
"""How a layer is split: a count of units split evenly over the ranks, or this rank's range of them
when the split is decided elsewhere (the query heads of a ``QKVParallelLinear``)."""


@runtime_checkable
class WeightSource(Protocol):
    """A checkpoint's tensors by their Hugging Face names, each read as the slice a rank holds, and the
    linear method of each layer (vLLM's ``QuantizationConfig.get_quant_method(layer, prefix)``)."""

    dtype: torch.dtype  # the model's
    device: torch.device

    def has(self, name: str) -> bool: ...

    def get(
        self, name: str, rows: Range = None, cols: Range = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Tensor ``name`` (its ``rows`` x ``cols`` slice) on the device in ``dtype`` (None: the model's;
        a quantized layer keeps its integers); ``MissingTensorError`` if absent."""

    def get_quantized(self, name: str, rows: Range = None, cols: Range = None) -> Loaded:
        """The checkpoint's own quantized form of ``name`` (GGUF blocks, GPTQ/AWQ tensors) repacked into
        our formats, only this slice; else the float tensor in the model's dtype."""

    def linear_method(self, prefixes: Sequence[str], cols: Range, head: bool = False) -> LinearMethod:
        """The method of the linear over the tensors ``<prefix>.weight`` read with input columns ``cols``;
        ``head``: the LM head's. Parts the checkpoint stores in different formats are served dense."""

    def mark_used(self, name: str) -> None:
        """Count ``name`` as read without reading it (a tensor only another rank holds, a saved copy
        of a shared one), so that it is not reported as unused."""

    def unused(self) -> list[str]:
        """Checkpoint tensors the model did not read (reported at load time)."""


class LinearMethod(Protocol):
    """How a linear layer's weights are stored and multiplied (dense, quantized, with a LoRA delta)."""

    def load(
        self, layer: Linear, weights: WeightSource, parts: Sequence[tuple[str, Range]], cols: Range
    ) -> None:
        """Set ``layer``'s parameters from the checkpoint: the ``parts`` (tensor prefix, its rows)
        stacked by output rows, each read with the input columns ``cols``."""

    def apply(self, layer: Linear, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        """``x W^T + layer.bias`` (the bias may be None), in x's dtype or, ``float_out``, in float32
        (the LM head's logits: not rounded to bfloat16 where the kernel computes in float32)."""


class UnquantizedLinear:
    """A dense ``<prefix>.weight`` [out, in] stored in ``dtype`` (None: the model's dtype)."""

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype

    def load(
        self, layer: Linear, weights: WeightSource, parts: Sequence[tuple[str, Range]], cols: Range
    ) -> None:
        layer.weight = _cat([weights.get(f"{p}.weight", rows, cols, self.dtype) for p, rows in parts])

    def apply(self, layer: Linear, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        return dense_linear(x, layer.weight, layer.bias, float_out)


def _measured_gemv_rows() -> dict[torch.dtype, int]:
    """Up to how many rows of x our gemv beats torch's matmul, per x's dtype, on this CPU (measured
    with SmolLM2's shapes, docs/benchmarks.md): float32 MKL reads weights at ~11 GB/s for a few rows
    where ours streams ~20; with AVX512-BF16, oneDNN's bfloat16 dot products win from ~16 rows."""
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return {torch.float32: 64 if avx512 else 16, torch.bfloat16: 8 if cpu_has_bf16() else 64}


GEMV_ROWS = _measured_gemv_rows()


def gemv_rows(dtype: torch.dtype) -> int:
    """Up to how many rows of x ``dense_linear`` runs our gemv (above: torch's matmul): every row when
    the steps are batch-invariant, else ``GEMV_ROWS``."""
    return 1 << 62 if native.INVARIANT else GEMV_ROWS.get(dtype, 0)


def dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, float_out: bool = False
) -> torch.Tensor:
    """``F.linear``, or our gemv (``csrc/gemv.cpp``) on CPU: for few rows of x (decode steps), and for
    every row when the steps are batch-invariant (``native.INVARIANT``: its rows reduce alike).
    ``float_out``: float32 (the gemv's own sums, not rounded to x's dtype)."""
    rows = x.numel() // x.shape[-1]
    few = rows <= gemv_rows(x.dtype)
    same = weight.dtype == x.dtype and weight.is_contiguous()
    if rows > 0 and few and same and weight.device.type == "cpu":
        ext = native.extension()
        if ext is not None:
            y = ext.gemv(x.reshape(rows, -1), weight, bias, native.ISA, float_out)
            return y.view(*x.shape[:-1], -1)
    y = F.linear(x, weight, bias)
    return y.float() if float_out else y


def _rowwise_kernel(x: torch.Tensor):
    """The extension when it takes ``x`` row by row (``csrc/rowwise.cpp``: CPU, float32 or bfloat16)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    return native.extension()


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a gate|up matmul's output [..., 2 * width] (each rank's own units)."""
    ext = _rowwise_kernel(gate_up)
    if ext is not None:
        rows = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
        return ext.silu_mul(rows, native.ISA).view(*gate_up.shape[:-1], -1)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (transformers' ``gelu_pytorch_tanh``: StarCoder2's MLP)."""
    return F.gelu(x, approximate="tanh")


class Linear:
    """``x W^T + b`` over checkpoint ``parts`` (tensor prefix, its rows) stacked by output rows, read
    with input columns ``cols``: several parts make one matmul (q|k|v, gate|up)."""

    def __init__(
        self,
        weights: WeightSource,
        parts: Sequence[tuple[str, Range]],
        cols: Range = None,
        bias: bool = False,
        method: LinearMethod | None = None,
    ):
        self.method = method or weights.linear_method([p for p, _ in parts], cols)
        self.method.load(self, weights, parts, cols)
        self.bias = _cat([weights.get(f"{p}.bias", rows) for p, rows in parts]) if bias else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)


class MergedColumnParallelLinear(Linear):
    """Linears with the same input stacked into one matmul (gate|up, T5's k|v): each splits its
    ``units`` of ``width`` output rows over the ranks alike; ``split`` cuts the output back. A prefix
    named once per part is one checkpoint tensor holding them all (Phi-3's gate_up_proj)."""

    def __init__(
        self,
        weights: WeightSource,
        prefixes: Sequence[str],
        shard: Shard,
        units: Units,
        width: int = 1,
        bias: bool = False,
        method: LinearMethod | None = None,
    ):
        (lo, hi), rows = _slice(shard, units, width)
        whole = units * width if isinstance(units, int) else None  # each part's rows in the checkpoint
        super().__init__(weights, _stacked([(p, rows, whole) for p in prefixes]), None, bias, method)
        self.sizes = [(hi - lo) * width] * len(prefixes)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(self.sizes, dim=-1)


class ColumnParallelLinear(MergedColumnParallelLinear):
    """This rank's range of the output features (``units`` of ``width`` rows), a merge of one: no
    communication, as its consumer works on the same range (heads, MLP units)."""

    def __init__(
        self,
        weights: WeightSource,
        prefix: str,
        shard: Shard,
        units: Units,
        width: int = 1,
        bias: bool = False,
        method: LinearMethod | None = None,
    ):
        super().__init__(weights, [prefix], shard, units, width, bias, method)


class QKVParallelLinear(Linear):
    """q|k|v in one matmul, split by heads: a rank's query heads follow their KV heads, and KV heads
    are replicated when there are fewer than ranks (``Shard.heads``). One prefix named three times is
    one checkpoint tensor q|k|v (Phi-3's qkv_proj)."""

    def __init__(
        self,
        weights: WeightSource,
        prefixes: Sequence[str],
        shard: Shard,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool = False,
        method: LinearMethod | None = None,
    ):
        q_heads, kv_heads = shard.heads(num_heads, num_kv_heads)
        q, kv = shard.rows(q_heads, head_dim), shard.rows(kv_heads, head_dim)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        parts = zip(prefixes, (q, kv, kv), (q_size, kv_size, kv_size), strict=True)
        super().__init__(weights, _stacked(list(parts)), None, bias, method)
        self.q_heads = q_heads  # the output projection takes the matching input columns
        self.num_heads, self.num_kv_heads = q_heads[1] - q_heads[0], kv_heads[1] - kv_heads[0]
        self.head_dim = head_dim

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The output as q [T, heads, head_dim], k and v [T, kv_heads, head_dim]."""
        d, heads, kv_heads = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = y.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        return q.view(-1, heads, d), k.view(-1, kv_heads, d), v.view(-1, kv_heads, d)


class RowParallelLinear(Linear):
    """This rank's range of the input features (``units`` of ``width`` columns); one all-reduce sums
    the ranks' partial outputs, so the bias, added once, lives on rank 0 only."""

    def __init__(
        self,
        weights: WeightSource,
        prefix: str,
        shard: Shard,
        units: Units,
        width: int = 1,
        bias: bool = False,
        method: LinearMethod | None = None,
    ):
        _, cols = _slice(shard, units, width)
        super().__init__(weights, [(prefix, None)], cols, bias and shard.rank == 0, method)
        if bias and shard.rank != 0:
            weights.mark_used(f"{prefix}.bias")  # rank 0 reads it
        self.shard = shard

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard.all_reduce(self.method.apply(self, x))


class VocabParallelEmbedding:
    """This rank's range of the vocabulary: each rank looks up the ids it holds (zeros for the
    others) and an all-reduce sums the lookups. A quantized checkpoint's table (GGUF) stays
    quantized: only the rows looked up are dequantized."""

    def __init__(self, weights: WeightSource, name: str, shard: Shard, vocab_size: int):
        table = weights.get_quantized(name, rows=shard.part(vocab_size))
        self.weight = table.to(weights.dtype) if isinstance(table, torch.Tensor) else table
        self.name, self.dtype = name, weights.dtype
        self.shard, self.vocab_size = shard, vocab_size

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard.world == 1:
            return self._lookup(ids)
        lo, hi = self.shard.split(self.vocab_size)
        mine = (ids >= lo) & (ids < hi)
        x = self._lookup((ids - lo).clamp(0, hi - lo - 1))
        return self.shard.all_reduce(x * mine.unsqueeze(-1).to(x.dtype))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, torch.Tensor):
            return F.embedding(ids, self.weight)
        return self.weight.rows(ids.reshape(-1)).dequantize(self.dtype).view(*ids.shape, -1)


class ParallelLMHead(Linear):
    """This rank's range of the vocabulary's logits, gathered on rank 0 in float32 (None elsewhere).
    ``tied``: the embedding's own weight (same vocabulary range) instead of ``<prefix>.weight``,
    shared when the head is dense or when both keep the checkpoint's quantized table (GGUF: one copy of
    a 262k-vocabulary table, most of a small model's memory), else read again through the head's
    method (quantized at load)."""

    def __init__(
        self,
        weights: WeightSource,
        prefix: str,
        shard: Shard,
        vocab_size: int,
        tied: VocabParallelEmbedding | None = None,
        method: LinearMethod | None = None,
    ):
        source = prefix if tied is None else tied.name.removesuffix(".weight")
        shared = method is None and tied is not None and isinstance(tied.weight, torch.Tensor)
        method = method or weights.linear_method([source], None, head=True)
        if shared and isinstance(method, UnquantizedLinear):
            self.method, self.weight, self.bias = method, tied.weight, None
        else:
            source_weights = weights if tied is None else _TiedTable(weights, tied)
            super().__init__(source_weights, [(source, shard.part(vocab_size))], None, False, method)
        self.shard, self.vocab_size = shard, vocab_size

    def __call__(self, h: torch.Tensor) -> torch.Tensor | None:
        return self.shard.gather_vocab(self.method.apply(self, h, float_out=True), self.vocab_size)


class _TiedTable:
    """``weights`` but for ``get_quantized`` of a tied embedding's quantized table (all of this rank's
    vocabulary range), which gives the embedding's own: a method that keeps the checkpoint's blocks then
    holds the same tensors (one that serves dense dequantizes them)."""

    def __init__(self, weights: WeightSource, embedding: VocabParallelEmbedding):
        self.weights, self.embedding = weights, embedding

    def get_quantized(self, name: str, rows: Range = None, cols: Range = None) -> Loaded:
        e = self.embedding
        whole = rows == e.shard.part(e.vocab_size) and cols is None
        if name == e.name and whole and not isinstance(e.weight, torch.Tensor):
            return e.weight
        return self.weights.get_quantized(name, rows, cols)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.weights, attr)


class Rotary:
    """Rotary position embeddings (rotate-half, Llama's) at one step's ``positions``, from the model's
    cos and sin tables [positions, head_dim]: in place by the extension on CPU (``csrc/rowwise.cpp``: one
    pass for q and k), else torch's ops on gathered rows of the tables."""

    def __init__(self, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor):
        self.ext = _rowwise_kernel(cos_table)
        if self.ext is not None:
            self.tables, self.positions = (cos_table, sin_table), positions.long().contiguous()
        else:
            self.cos, self.sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, dim] and k [T, kv_heads, dim] in the tables' dtype, rotated (on CPU: the same
        tensors, rotated in place)."""
        if self.ext is not None:
            self.ext.rope_(q, k, *self.tables, self.positions)
            return q, k
        return self._torch(q), self._torch(k)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos + rotated * self.sin


class RMSNorm:
    """RMS norm (Llama, T5) as transformers: normalised in float32, scaled in the model dtype."""

    def __init__(self, weights: WeightSource, name: str, eps: float):
        self.weight = weights.get(name).contiguous()
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ext = _rowwise_kernel(x) if self.weight.dtype == x.dtype else None
        if ext is not None:
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            return ext.rms_norm(rows, self.weight, self.eps, native.ISA).view(x.shape)
        return self._torch(x)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x += delta`` (the residual stream, in place), then the norm of x: one pass on CPU."""
        ext = _rowwise_kernel(x) if self.weight.dtype == x.dtype == delta.dtype else None
        if ext is not None and x.dim() == 2 and x.is_contiguous() and delta.is_contiguous():
            return ext.add_rms_norm_(x, delta, self.weight, self.eps, native.ISA)
        return self(x.add_(delta))

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerNorm:
    """LayerNorm with ``<prefix>.weight`` and ``<prefix>.bias`` (BLOOM, StarCoder2)."""

    def __init__(self, weights: WeightSource, prefix: str, eps: float):
        self.weight = weights.get(f"{prefix}.weight")
        self.bias = weights.get(f"{prefix}.bias")
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x += delta`` (the residual stream, in place), then the norm of x (``RMSNorm``'s)."""
        return self(x.add_(delta))


def _slice(shard: Shard, units: Units, width: int) -> tuple[tuple[int, int], Range]:
    """(this rank's unit range, its rows or columns in the checkpoint tensor)."""
    lo, hi = shard.split(units) if isinstance(units, int) else units
    return (lo, hi), shard.rows((lo, hi), width)


def _stacked(parts: list[tuple[str, Range, int | None]]) -> list[tuple[str, Range]]:
    """Parts (prefix, this rank's rows, the part's rows in the checkpoint) as ``Linear`` reads them. A
    prefix named by several parts is one tensor that stacks them by rows in order (Phi-3's qkv_proj,
    gate_up_proj): each part's rows move past the parts before it."""
    counts = Counter(prefix for prefix, _, _ in parts)
    offsets: dict[str, int] = {}
    out: list[tuple[str, Range]] = []
    for prefix, rows, whole in parts:
        if counts[prefix] == 1:
            out.append((prefix, rows))
            continue
        if whole is None:
            raise ValueError(f"{prefix}: the parts of one tensor need their sizes (units as a count)")
        at = offsets.get(prefix, 0)
        lo, hi = rows or (0, whole)
        out.append((prefix, (at + lo, at + hi)))
        offsets[prefix] = at + whole
    return out


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    if tensors[0].is_meta:  # sizing a rank's weights: torch.cat on meta imports torch._dynamo (~1 s)
        rows = sum(t.shape[0] for t in tensors)
        return torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype, device="meta")
    return torch.cat(tensors)
