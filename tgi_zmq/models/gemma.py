"""The Gemma family (Gemma, Gemma 2, Gemma 3 text) over the paged KV cache.

Where Gemma differs from Llama: its RMS norms scale by ``1 + w`` in float32; the embedding is scaled by
sqrt(hidden) (rounded to the model's dtype); the MLP is GeGLU (tanh GELU); attention scales by
``query_pre_attn_scalar`` ** -0.5. Gemma 2 and 3 add a norm after attention and around the MLP, and
interleave sliding-window (local) layers with global ones; Gemma 2 soft-caps attention scores and the
final logits; Gemma 3 norms each query and key head and gives its local layers their own RoPE base.

The rotary cos/sin are made per step from the step's positions (not tables over the whole context: two
bases of 32k positions x 256 dims would be 134 MB for a 270M model).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from tgi_zmq.attention import KVCache, paged_attention
from tgi_zmq.forward_batch import ForwardBatch
from tgi_zmq.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    Rotary,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightSource,
)
from tgi_zmq.models.base import ModelConfig, PagedModel, layer_windows
from tgi_zmq.parallel import Shard
from tgi_zmq.rope import RopeConfig

GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class GemmaConfig(ModelConfig):
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig  # the global layers' (and every layer's before Gemma 3)
    rope_local: RopeConfig  # Gemma 3's sliding layers': their own base, never scaled
    query_pre_attn_scalar: float
    attn_softcap: float | None
    final_softcap: float | None
    layer_windows: tuple[int | None, ...]
    attention_bias: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> GemmaConfig:
        heads, head_dim = cfg["num_attention_heads"], cfg.get("head_dim") or 256
        return cls(
            model_type=cfg["model_type"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=RopeConfig.from_hf(cfg, head_dim),
            rope_local=RopeConfig.from_hf(local_rope(cfg), head_dim),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") or head_dim,
            attn_softcap=cfg.get("attn_logit_softcapping"),
            final_softcap=cfg.get("final_logit_softcapping"),
            layer_windows=cls.windows(cfg),
            attention_bias=cfg.get("attention_bias", False),
        )

    @classmethod
    def context_length(cls, hf: dict[str, Any]) -> int:
        """max_position_embeddings: Gemma 3's already counts its linear RoPE scaling."""
        return hf.get("max_position_embeddings") or 8192

    @classmethod
    def windows(cls, hf: dict[str, Any]) -> tuple[int | None, ...]:
        return layer_windows({**hf, "layer_types": cls.layer_types(hf)}, cls.sliding_window(hf))

    @classmethod
    def sliding_window(cls, hf: dict[str, Any]) -> int | None:
        window = hf.get("sliding_window") if hf["model_type"] != "gemma" else None
        return window if isinstance(window, int) and window > 0 else None

    @staticmethod
    def layer_types(hf: dict[str, Any]) -> list[str]:
        """config.json's, else transformers' defaults: Gemma 2 alternates local and global layers (local
        first), Gemma 3 has ``sliding_window_pattern`` - 1 local layers before each global one."""
        if hf.get("layer_types"):
            return hf["layer_types"]
        n, kind = hf["num_hidden_layers"], hf["model_type"]
        period = {"gemma2": 2, "gemma3_text": hf.get("sliding_window_pattern", 6)}.get(kind)
        return [
            "full_attention" if not period or (i + 1) % period == 0 else "sliding_attention" for i in range(n)
        ]


def local_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """The config of Gemma 3's local layers' RoPE: base ``rope_local_base_freq``, no scaling (others:
    the global one's)."""
    if hf["model_type"] != "gemma3_text":
        return hf
    return {**hf, "rope_theta": hf.get("rope_local_base_freq", 10000.0), "rope_scaling": None}


class GemmaRMSNorm:
    """``x / rms(x) * (1 + w)``, in float32, rounded once to the input's dtype (transformers' Gemma)."""

    def __init__(self, weights: WeightSource, name: str, eps: float):
        self.scale = 1.0 + weights.get(name, dtype=torch.float32)
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.scale).to(x.dtype)


@dataclasses.dataclass
class Layer:
    input_norm: GemmaRMSNorm
    qkv: QKVParallelLinear
    o: RowParallelLinear
    gate_up: MergedColumnParallelLinear
    down: RowParallelLinear
    post_attn_norm: GemmaRMSNorm | None  # Gemma 2 and 3
    pre_mlp_norm: GemmaRMSNorm  # Gemma's post_attention_layernorm, later pre_feedforward_layernorm
    post_mlp_norm: GemmaRMSNorm | None
    q_norm: GemmaRMSNorm | None  # Gemma 3
    k_norm: GemmaRMSNorm | None


class GemmaModel(PagedModel):
    """With tensor parallelism (``shard``), this rank's heads, MLP units and vocabulary slice."""

    def __init__(
        self, cfg: GemmaConfig, weights: WeightSource, dtype: torch.dtype, device: torch.device, shard: Shard
    ):
        super().__init__(cfg, dtype, device, shard)
        self.embed = VocabParallelEmbedding(weights, "model.embed_tokens.weight", shard, cfg.vocab_size)
        self.norm = GemmaRMSNorm(weights, "model.norm.weight", cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(weights, "lm_head", shard, cfg.vocab_size, self.embed)
        self.layers = [self._load_layer(weights, i) for i in range(cfg.num_layers)]
        self.num_heads, self.num_kv_heads = self.layers[0].qkv.num_heads, self.layers[0].qkv.num_kv_heads
        # sqrt(hidden) rounded to the model's dtype, as transformers multiplies by it
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=dtype).item()
        self.scale = cfg.query_pre_attn_scalar**-0.5
        # (inverse frequencies, attention factor) ("_table": rotary buffers, not weights): the global
        # layers' and Gemma 3's local layers'
        self.freq_table = _frequencies(cfg.rope, device)
        local = cfg.model_type == "gemma3_text"
        self.local_freq_table = _frequencies(cfg.rope_local, device) if local else self.freq_table

    def _load_layer(self, w: WeightSource, i: int) -> Layer:
        c, shard = self.cfg, self.shard
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."

        def norm(name: str) -> GemmaRMSNorm:
            return GemmaRMSNorm(w, p + name + ".weight", c.rms_norm_eps)

        def head_norm(name: str) -> GemmaRMSNorm | None:
            return (
                GemmaRMSNorm(w, attn + name + ".weight", c.rms_norm_eps)
                if w.has(attn + name + ".weight")
                else None
            )

        names = [attn + n for n in ("q_proj", "k_proj", "v_proj")]
        qkv = QKVParallelLinear(
            w, names, shard, c.num_heads, c.num_kv_heads, c.head_dim, bias=c.attention_bias
        )
        later = c.model_type != "gemma"  # Gemma 2 and 3: four norms a layer
        return Layer(
            input_norm=norm("input_layernorm"),
            qkv=qkv,
            o=RowParallelLinear(w, attn + "o_proj", shard, qkv.q_heads, c.head_dim, bias=c.attention_bias),
            gate_up=MergedColumnParallelLinear(
                w, [mlp + "gate_proj", mlp + "up_proj"], shard, c.intermediate_size
            ),
            down=RowParallelLinear(w, mlp + "down_proj", shard, c.intermediate_size),
            post_attn_norm=norm("post_attention_layernorm") if later else None,
            pre_mlp_norm=norm("pre_feedforward_layernorm" if later else "post_attention_layernorm"),
            post_mlp_norm=norm("post_feedforward_layernorm") if later else None,
            q_norm=head_norm("q_norm"),
            k_norm=head_norm("k_norm"),
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor | None:
        """Run the step's flat tokens (see ``tgi_zmq.step``); float32 logits of ``logit_rows`` (rank 0's;
        None on the other ranks)."""
        x = self.embed(batch.input_ids) * self.embed_scale
        rope = self._rotary(self.freq_table, batch.positions)
        local_rope = (
            rope
            if self.local_freq_table is self.freq_table
            else self._rotary(self.local_freq_table, batch.positions)
        )
        for i, layer in enumerate(self.layers):
            window = self.cfg.layer_windows[i]
            x = self._layer(layer, x, local_rope if window else rope, cache, i, batch, window)
        logits = self.lm_head(self.norm(x[batch.logit_rows]))
        softcap = self.cfg.final_softcap
        return logits if logits is None or not softcap else torch.tanh(logits / softcap) * softcap

    def _rotary(self, frequencies: tuple[torch.Tensor, float], positions: torch.Tensor) -> Rotary:
        """The step's rotary embedding: cos/sin of its own positions only."""
        inv_freq, factor = frequencies
        freqs = torch.outer(positions.float(), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        rows = torch.arange(len(positions), device=positions.device)
        return Rotary((emb.cos() * factor).to(self.dtype), (emb.sin() * factor).to(self.dtype), rows)

    def _layer(
        self,
        layer: Layer,
        x: torch.Tensor,
        rope: Rotary,
        cache: KVCache,
        i: int,
        batch: ForwardBatch,
        window: int | None,
    ) -> torch.Tensor:
        """Layer ``i`` over the residual stream ``x``: the new stream."""
        q, k, v = layer.qkv.split(layer.qkv(layer.input_norm(x)))
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = rope(q, k)
        attn = paged_attention(
            q, k, v, cache.k[i], cache.v[i], batch.attention, self.scale, window, self.cfg.attn_softcap
        )
        h = layer.o(attn.flatten(1))
        x = x + (h if layer.post_attn_norm is None else layer.post_attn_norm(h))
        gate, up = layer.gate_up(layer.pre_mlp_norm(x)).chunk(2, dim=-1)
        h = layer.down(F.gelu(gate, approximate="tanh") * up)
        return x + (h if layer.post_mlp_norm is None else layer.post_mlp_norm(h))


def _frequencies(rope: RopeConfig, device: torch.device) -> tuple[torch.Tensor, float]:
    """A RoPE's inverse frequencies on ``device`` and its attention factor (cos/sin made per step: not
    dynamic NTK, whose frequencies change with the position)."""
    if rope.kind == "dynamic":
        raise ValueError("dynamic NTK rope scaling is not supported for Gemma")
    inv_freq, factor = rope.inv_freq()
    return inv_freq.to(device), factor
