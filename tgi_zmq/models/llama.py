"""The Llama family (SmolLM2, Llama 2/3, Mistral, Qwen2) in plain torch over the paged KV cache.

Mistral is Llama with a sliding window (the launcher caps the context to it); Qwen2 is Llama
with q/k/v biases and, in its small sizes, tied embeddings.

Weights are fused at load time (q|k|v into one matrix, gate|up into one) so a layer is
four matmuls; the step's tokens are one flat batch (no padding) and only the rows that
sample a token go through the LM head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from tgi_zmq.attention import AttentionMetadata, KVCache, paged_attention
from tgi_zmq.models.base import PagedModel
from tgi_zmq.models.weights import Weights
from tgi_zmq.parallel import Shard, embed


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        heads = cfg["num_attention_heads"]
        qwen2 = cfg.get("model_type") == "qwen2"
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=qwen2 or cfg.get("attention_bias", False),
            o_bias=not qwen2 and cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
        )


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama 3 / linear rope scaling when the config asks for it."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind not in ("default", None):
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


@dataclasses.dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


class LlamaModel(PagedModel):
    """With tensor parallelism (``shard``), this rank's heads, MLP units and vocabulary slice."""

    def __init__(
        self, cfg: LlamaConfig, weights: Weights, dtype: torch.dtype, device: torch.device, shard: Shard
    ):
        super().__init__(cfg, dtype, device, shard)
        (q_lo, q_hi), (kv_lo, kv_hi) = shard.heads(cfg.num_heads, cfg.num_kv_heads)
        self.num_heads, self.num_kv_heads = q_hi - q_lo, kv_hi - kv_lo
        self.head_rows = shard.rows((q_lo, q_hi), cfg.head_dim)
        self.kv_rows = shard.rows((kv_lo, kv_hi), cfg.head_dim)
        vocab = shard.part(cfg.vocab_size)
        self.embed = weights.get("model.embed_tokens.weight", rows=vocab)
        self.norm = weights.get("model.norm.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights.get("lm_head.weight", rows=vocab)
        self.layers = [self._load_layer(weights, i) for i in range(cfg.num_layers)]
        inv_freq = rope_inv_freq(cfg)
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos_table = emb.cos().to(dtype).to(device)
        self.sin_table = emb.sin().to(dtype).to(device)
        self.scale = cfg.head_dim**-0.5

    def _load_layer(self, w: Weights, i: int) -> Layer:
        c = self.cfg
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."

        units = self.shard.part(c.intermediate_size)
        qkv_rows = {"q_proj": self.head_rows, "k_proj": self.kv_rows, "v_proj": self.kv_rows}

        def fused(prefix: str, rows: dict, suffix: str, present: bool = True) -> torch.Tensor | None:
            return (
                torch.cat([w.get(f"{prefix}{n}.{suffix}", rows=r) for n, r in rows.items()])
                if present
                else None
            )

        gate_up = {"gate_proj": units, "up_proj": units}
        return Layer(
            input_norm=w.get(p + "input_layernorm.weight"),
            qkv=fused(attn, qkv_rows, "weight"),
            qkv_bias=fused(attn, qkv_rows, "bias", c.qkv_bias),
            o=w.get(attn + "o_proj.weight", cols=self.head_rows),
            o_bias=w.get_row_bias(attn + "o_proj.bias", self.shard.rank) if c.o_bias else None,
            post_norm=w.get(p + "post_attention_layernorm.weight"),
            gate_up=fused(mlp, gate_up, "weight"),
            gate_up_bias=fused(mlp, gate_up, "bias", c.mlp_bias),
            down=w.get(mlp + "down_proj.weight", cols=units),
            down_bias=w.get_row_bias(mlp + "down_proj.bias", self.shard.rank) if c.mlp_bias else None,
        )

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Like transformers: normalise in float32, scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return weight * xf.to(x.dtype)

    @torch.inference_mode()
    def forward(
        self, step: dict[str, torch.Tensor], cache: KVCache, meta: AttentionMetadata, logit_rows: torch.Tensor
    ) -> torch.Tensor | None:
        """Run the step's flat tokens (see ``tgi_zmq.step``); float32 logits of ``logit_rows``.

        With tensor parallelism only rank 0 gets the logits (None on the other ranks).
        """
        c, shard = self.cfg, self.shard
        x = embed(step["input_ids"], self.embed, shard, c.vocab_size)
        cos = self.cos_table[step["positions"]].unsqueeze(1)
        sin = self.sin_table[step["positions"]].unsqueeze(1)
        q_size, kv_size = self.num_heads * c.head_dim, self.num_kv_heads * c.head_dim
        for i, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.input_norm)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = _rope(q.view(-1, self.num_heads, c.head_dim), cos, sin)
            k = _rope(k.view(-1, self.num_kv_heads, c.head_dim), cos, sin)
            v = v.view(-1, self.num_kv_heads, c.head_dim)
            attn = paged_attention(q, k, v, cache.k[i], cache.v[i], meta, self.scale)
            x = x + shard.all_reduce(F.linear(attn.reshape(-1, q_size), layer.o, layer.o_bias))
            h = self._rms_norm(x, layer.post_norm)
            gate, up = F.linear(h, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            x = x + shard.all_reduce(F.linear(F.silu(gate) * up, layer.down, layer.down_bias))
        h = self._rms_norm(x[logit_rows], self.norm)
        return shard.gather_vocab(F.linear(h, self.lm_head).float(), c.vocab_size)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
