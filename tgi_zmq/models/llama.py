"""The Llama family (SmolLM2, Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3, StarCoder2) in plain torch over
the paged KV cache.

Mistral is Llama with a sliding window; Qwen2 is Llama with q/k/v biases and, in its small sizes, tied
embeddings; Qwen3 adds an RMS norm of each query and key head before the rotary embedding. Phi-3 stores
q|k|v and gate|up as one tensor each (split on load like any other parts) and scales RoPE with LongRoPE.
StarCoder2 has LayerNorms with biases, biases on every linear and an MLP without a gate (c_fc ->
gelu(tanh) -> c_proj). RoPE and its scalings: ``tgi_zmq.rope``.
Mixtral and Qwen3-MoE (``tgi_zmq.models.moe``) are this model with a mixture of experts as a layer's
MLP (``_load_mlp``).

q|k|v and gate|up are each one fused layer (one matmul), so a layer is four matmuls; the step's
tokens are one flat batch (no padding) and only the rows that sample a token go through the LM head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from tgi_zmq import native
from tgi_zmq.attention import KVCache, paged_attention
from tgi_zmq.forward_batch import ForwardBatch
from tgi_zmq.layers import (
    ColumnParallelLinear,
    LayerNorm,
    Linear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    Rotary,
    RowParallelLinear,
    UnquantizedLinear,
    VocabParallelEmbedding,
    WeightSource,
    gelu_tanh,
    gemv_rows,
    silu_and_mul,
)
from tgi_zmq.models.base import ModelConfig, PagedModel, layer_windows
from tgi_zmq.parallel import Shard
from tgi_zmq.quant import kernels
from tgi_zmq.quant.formats import Int8Weight
from tgi_zmq.quant.linear import QuantizedLinear
from tgi_zmq.rope import RopeConfig

QK_NORM_TYPES = ("qwen3", "qwen3_moe")
FUSED_TYPES = ("phi3",)  # q|k|v in one qkv_proj tensor, gate|up in one gate_up_proj


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: q_norm and k_norm over each head
    fused: bool  # Phi-3: qkv_proj and gate_up_proj tensors
    layer_norm: bool  # StarCoder2: LayerNorm with biases (else RMS norm)
    gated: bool  # silu(gate) * up (else StarCoder2's c_fc -> gelu(tanh) -> c_proj)
    layer_windows: tuple[int | None, ...]  # each layer's sliding attention window (None: full attention)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        heads = cfg["num_attention_heads"]
        model_type = cfg.get("model_type")
        qwen2, starcoder2 = model_type == "qwen2", model_type == "starcoder2"
        _check_activation(cfg, starcoder2)
        bias = cfg.get("use_bias", True) if starcoder2 else cfg.get("attention_bias", False)
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=_head_dim(cfg),
            vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("norm_epsilon", 1e-5) if starcoder2 else cfg.get("rms_norm_eps", 1e-6),
            rope=RopeConfig.from_hf(cfg, _head_dim(cfg)),
            tie_word_embeddings=cfg.get("tie_word_embeddings", starcoder2),  # transformers' defaults
            qkv_bias=qwen2 or bias,
            o_bias=not qwen2 and bias,
            mlp_bias=bias if starcoder2 else cfg.get("mlp_bias", False),
            qk_norm=model_type in QK_NORM_TYPES,
            fused=model_type in FUSED_TYPES,
            layer_norm=starcoder2,
            gated=not starcoder2,
            layer_windows=cls.windows(cfg),
        )

    @classmethod
    def context_length(cls, hf: dict[str, Any]) -> int:
        """The positions the rotary tables hold (a RoPE scaling may stretch them past the config's)."""
        return RopeConfig.from_hf(hf, _head_dim(hf)).context_length()

    @classmethod
    def windows(cls, hf: dict[str, Any]) -> tuple[int | None, ...]:
        """Qwen2's and Qwen3's first ``max_window_layers`` layers see the whole context (transformers' rule,
        where config.json has no ``layer_types``)."""
        if hf.get("model_type") in ("qwen2", "qwen3") and not hf.get("layer_types"):
            full = hf.get("max_window_layers", 28)  # its default there
            types = [
                "full_attention" if i < full else "sliding_attention" for i in range(hf["num_hidden_layers"])
            ]
            hf = {**hf, "layer_types": types}
        return layer_windows(hf, cls.sliding_window(hf))

    @classmethod
    def sliding_window(cls, hf: dict[str, Any]) -> int | None:
        """Mistral's attention window (and Qwen2's, when it enables it; Phi-3's, StarCoder2's)."""
        window = hf.get("sliding_window")
        if hf.get("model_type", "").startswith("qwen") and not hf.get("use_sliding_window"):
            return None
        return window if isinstance(window, int) and window > 0 else None


def _head_dim(hf: dict[str, Any]) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def _check_activation(hf: dict[str, Any], starcoder2: bool) -> None:
    """The MLP's activation is the one this module computes (another would give wrong tokens)."""
    act, expected = hf.get("hidden_act"), "gelu_pytorch_tanh" if starcoder2 else "silu"
    if act not in (None, expected):
        model_type = hf.get("model_type")
        raise ValueError(
            f"hidden_act {act!r} (config.json) is not supported for {model_type!r}: {expected} is"
        )


@dataclasses.dataclass
class Layer:
    input_norm: RMSNorm | LayerNorm
    qkv: QKVParallelLinear
    o: RowParallelLinear
    post_norm: RMSNorm | LayerNorm
    gate_up: MergedColumnParallelLinear | None = None  # StarCoder2: c_fc; None: experts (``moe``)
    down: RowParallelLinear | None = None
    q_norm: RMSNorm | None = None  # Qwen3's, over each head
    k_norm: RMSNorm | None = None
    moe: Callable[[torch.Tensor], torch.Tensor] | None = None  # tgi_zmq.models.moe's sparse block
    act: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul  # StarCoder2's: gelu(tanh), no gate

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward block of the normed stream ``x`` (all-reduced over the ranks)."""
        if self.moe is not None:
            return self.moe(x)
        return self.down(self.act(self.gate_up(x)))


class LlamaModel(PagedModel):
    """With tensor parallelism (``shard``), this rank's heads, MLP units and vocabulary slice."""

    batch_invariant = True  # every op is a row-wise kernel or exact elementwise arithmetic
    use_native_stack = True  # False: always the Python layers (scripts/stepbench and tests compare them)

    def __init__(
        self, cfg: LlamaConfig, weights: WeightSource, dtype: torch.dtype, device: torch.device, shard: Shard
    ):
        super().__init__(cfg, dtype, device, shard)
        self.embed = VocabParallelEmbedding(weights, "model.embed_tokens.weight", shard, cfg.vocab_size)
        self.norm = self._norm(weights, "model.norm")
        tied = self.embed if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(weights, "lm_head", shard, cfg.vocab_size, tied)
        self.layers = [self._load_layer(weights, i) for i in range(cfg.num_layers)]
        self.num_heads, self.num_kv_heads = self.layers[0].qkv.num_heads, self.layers[0].qkv.num_kv_heads
        self.cos_table, self.sin_table = cfg.rope.tables(dtype, device)
        self.scale = cfg.head_dim**-0.5
        self._stack: NativeStack | None = None  # ``native_stack``'s, once decided

    def _load_layer(self, w: WeightSource, i: int) -> Layer:
        c, shard = self.cfg, self.shard
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        qkv_names = [attn + "qkv_proj"] * 3 if c.fused else [attn + n for n in ("q_proj", "k_proj", "v_proj")]
        qkv = QKVParallelLinear(w, qkv_names, shard, c.num_heads, c.num_kv_heads, c.head_dim, bias=c.qkv_bias)
        head_norms = {}
        if c.qk_norm:
            head_norms = {n: RMSNorm(w, f"{attn}{n}.weight", c.norm_eps) for n in ("q_norm", "k_norm")}
        return Layer(
            input_norm=self._norm(w, p + "input_layernorm"),
            qkv=qkv,
            o=RowParallelLinear(w, attn + "o_proj", shard, qkv.q_heads, c.head_dim, bias=c.o_bias),
            post_norm=self._norm(w, p + "post_attention_layernorm"),
            **self._load_mlp(w, i),
            **head_norms,
        )

    def _load_mlp(self, w: WeightSource, i: int) -> dict[str, Any]:
        """Layer ``i``'s feed-forward fields of ``Layer``: the dense gate|up (or c_fc), down and the
        activation (a subclass may load a mixture of experts instead)."""
        c, mlp = self.cfg, f"model.layers.{i}.mlp."
        down = mlp + ("down_proj" if c.gated else "c_proj")
        return dict(
            gate_up=self._mlp_in(w, mlp),
            down=RowParallelLinear(w, down, self.shard, c.intermediate_size, bias=c.mlp_bias),
            act=silu_and_mul if c.gated else gelu_tanh,
        )

    def _norm(self, w: WeightSource, prefix: str) -> RMSNorm | LayerNorm:
        eps = self.cfg.norm_eps
        return LayerNorm(w, prefix, eps) if self.cfg.layer_norm else RMSNorm(w, prefix + ".weight", eps)

    def _mlp_in(self, w: WeightSource, mlp: str) -> MergedColumnParallelLinear:
        """gate|up (Phi-3: both in one gate_up_proj tensor), or StarCoder2's c_fc."""
        c, units = self.cfg, self.cfg.intermediate_size
        if not c.gated:
            return ColumnParallelLinear(w, mlp + "c_fc", self.shard, units, bias=c.mlp_bias)
        names = [mlp + "gate_up_proj"] * 2 if c.fused else [mlp + "gate_proj", mlp + "up_proj"]
        return MergedColumnParallelLinear(w, names, self.shard, units, bias=c.mlp_bias)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor | None:
        """Run the step's flat tokens (see ``tgi_zmq.step``); float32 logits of ``logit_rows``.

        With tensor parallelism only rank 0 gets the logits (None on the other ranks).
        """
        x = self.embed(batch.input_ids)  # the residual stream, added to in place
        meta = batch.attention
        in_place = meta.in_place is not None and meta.in_order and x.dim() == 2
        if in_place and self.native_stack(x.shape[0]):
            mlp = self._native_layers(x, batch, cache)
        else:
            mlp = self._layers(x, batch, cache)
        rows = batch.logit_rows  # the last residual add and the final norm only where logits are taken
        return self.lm_head(self.norm(x[rows] + mlp[rows]))

    def _layers(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Every layer over the residual stream ``x`` (in place); the last layer's MLP output."""
        rope = Rotary(self.cos_table, self.sin_table, batch.positions)
        normed = self.layers[0].input_norm(x)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv.split(layer.qkv(normed))
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = rope(q, k)
            window = self.cfg.layer_windows[i]
            attn = paged_attention(q, k, v, cache.k[i], cache.v[i], batch.attention, self.scale, window)
            normed = layer.post_norm.add_and_norm(x, layer.o(attn.flatten(1)))
            mlp = layer.mlp(normed)
            if i + 1 < len(self.layers):
                normed = self.layers[i + 1].input_norm.add_and_norm(x, mlp)
        return mlp

    def _native_layers(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """``_layers`` in one call of the extension (``csrc/llama_stack.cpp``: the same kernels in the same
        order, so the same bits), for a step whose every row the in-place attention kernel serves."""
        _, tables, lens = batch.attention.in_place
        return native.extension().llama_layers(
            x, self._stack.layers, self._stack.groups, cache.k, cache.v, batch.attention.slot_mapping,
            self.cos_table, self.sin_table, batch.positions.long().contiguous(), tables, lens,
            self.num_heads, self.num_kv_heads, self.cfg.norm_eps, self.scale, gemv_rows(self.dtype),
            native.INVARIANT, native.ISA,
        )  # fmt: skip

    def native_stack(self, rows: int) -> bool:
        """Whether a step of ``rows`` tokens may run ``_native_layers``: the extension loaded, one rank on
        the CPU (ranks all-reduce between the matmuls), RMS norms and a gated MLP, norms, rotary tables
        and pages in the model's float dtype, dense weights of that dtype or quantized ones the fused
        kernel takes at ``rows`` (as ``kernels.linear`` chooses), no bias but q|k|v's. Decided at the
        first step (the weights are loaded by then)."""
        if self._stack is None:
            self._stack = NativeStack.of(self) or NativeStack([], [], [])
        fused = all(p.kernel(rows, self.dtype) == "fused" for p in self._stack.quantized)
        return bool(self._stack.layers) and self.use_native_stack and fused


@dataclasses.dataclass
class NativeStack:
    """Each layer's tensors for ``csrc/llama_stack.cpp`` (input_norm, post_norm, qkv bias, then 4 tensors
    per linear), the linears' groups (0: dense), and one quantized weight of each kind (which kernel
    serves a step's rows)."""

    layers: list[list[torch.Tensor]]
    groups: list[int]
    quantized: list[kernels.Prepared]

    @classmethod
    def of(cls, model: LlamaModel) -> NativeStack | None:
        """``model``'s, or None where the extension cannot serve its layers."""
        dtype = model.dtype
        if (
            native.extension() is None
            or model.shard.world > 1
            or torch.device(model.device).type != "cpu"
            or dtype not in (torch.float32, torch.bfloat16)
            or model.kv_dtype != dtype
            or model.cos_table.dtype != dtype
            or model.cfg.layer_norm
            or not model.cfg.gated
        ):
            return None
        stack = cls([], [], [])
        kinds: dict[str, kernels.Prepared] = {}
        for layer in model.layers:
            linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
            norms = [layer.input_norm.weight, layer.post_norm.weight]
            if layer.q_norm is not None or layer.moe is not None or any(model.cfg.layer_windows):
                return None
            if any(w.dtype != dtype for w in norms) or any(lin.bias is not None for lin in linears[1:]):
                return None
            tensors = norms + [_NONE if layer.qkv.bias is None else layer.qkv.bias]
            for linear in linears:
                parts = _weight_parts(linear, dtype)
                if parts is None:
                    return None
                tensors += parts[0]
                stack.groups.append(parts[1])
                if parts[1]:
                    kinds.setdefault(linear.qweight.format, linear.qweight)
            stack.layers.append(tensors)
        stack.quantized = list(kinds.values())
        return stack


_NONE = torch.empty(0)  # a tensor the format has not, for csrc/llama_stack.cpp


def _weight_parts(linear: Linear, dtype: torch.dtype) -> tuple[list[torch.Tensor], int] | None:
    """A linear's 4 tensors and group for csrc/llama_stack.cpp: a dense weight of ``dtype`` (group 0), or
    a quantized one in input order the fused kernel can take; None for any other."""
    if isinstance(linear.method, UnquantizedLinear):
        weight = linear.weight
        if weight.dtype != dtype or not weight.is_contiguous():
            return None
        return [weight, _NONE, _NONE, _NONE], 0
    prepared = getattr(linear, "qweight", None)
    if not isinstance(linear.method, QuantizedLinear) or linear.perm is not None or prepared is None:
        return None
    if prepared.forced not in (None, "fused"):
        return None
    w = prepared.weight
    if isinstance(w, Int8Weight):
        return [w.qweight, w.scales, _NONE if w.offsets is None else w.offsets, _NONE], w.group
    return [w.packed, w.scales, w.offsets, w.lut], w.group
