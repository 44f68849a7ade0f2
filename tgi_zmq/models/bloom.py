"""BLOOM (bigscience/bloom-*) in plain torch over the paged KV cache.

What differs from Llama:
- no rotary embeddings: ALiBi adds ``slope_h * (key_pos - query_pos)`` to head h's scores,
  folded into the step's attention masks once per forward (``add_position_bias``). That is
  transformers' ``slope_h * key_pos`` shifted by a per-query constant (same softmax), and keeps
  the biases of near tokens small, which bfloat16 masks need;
- LayerNorms with biases everywhere, plus one right after the word embeddings;
- the fused ``query_key_value`` is stored per head ([heads, 3, head_dim] rows): one matmul, then
  a view by head gives q, k and v, as transformers does;
- a tanh-GELU MLP (dense_h_to_4h, dense_4h_to_h), biases on every linear;
- ``apply_residual_connection_post_layernorm``: the residual is the normed input, not the input;
- the LM head is the word embeddings (unless the checkpoint says otherwise).
Checkpoints saved by transformers prefix names with ``transformer.``; bigscience's own don't.

Tensor parallelism splits by heads as for Llama: a head's q|k|v rows are contiguous in the fused
matrix, so a rank reads its heads' rows in one slice (and takes their ALiBi slopes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from tgi_zmq.attention import KVCache, paged_attention
from tgi_zmq.forward_batch import ForwardBatch
from tgi_zmq.layers import (
    ColumnParallelLinear,
    LayerNorm,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightSource,
)
from tgi_zmq.models.base import ModelConfig, PagedModel
from tgi_zmq.parallel import Shard


@dataclasses.dataclass(frozen=True)
class BloomConfig(ModelConfig):
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    vocab_size: int
    layer_norm_epsilon: float
    residual_post_layernorm: bool
    tie_word_embeddings: bool

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> BloomConfig:
        hidden = cfg.get("hidden_size") or cfg["n_embed"]
        heads = cfg.get("n_head") or cfg["num_attention_heads"]
        return cls(
            hidden_size=hidden,
            num_layers=cfg.get("n_layer") or cfg["num_hidden_layers"],
            num_heads=heads,
            head_dim=hidden // heads,
            vocab_size=cfg["vocab_size"],
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
            residual_post_layernorm=cfg.get("apply_residual_connection_post_layernorm", False),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        )


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head float32 slopes, computed exactly as transformers' ``build_alibi_tensor``."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:  # the other heads take every other slope of the next power of 2
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


@dataclasses.dataclass
class Layer:
    input_norm: LayerNorm
    qkv: ColumnParallelLinear  # per head: its q, k and v rows
    o: RowParallelLinear
    post_norm: LayerNorm
    up: ColumnParallelLinear
    down: RowParallelLinear


class BloomModel(PagedModel):
    """With tensor parallelism (``shard``), this rank's heads, MLP units and vocabulary slice."""

    def __init__(
        self, cfg: BloomConfig, weights: WeightSource, dtype: torch.dtype, device: torch.device, shard: Shard
    ):
        super().__init__(cfg, dtype, device, shard)
        self.heads, _ = shard.heads(cfg.num_heads, cfg.num_kv_heads)
        self.num_heads = self.num_kv_heads = self.heads[1] - self.heads[0]
        w = weights
        self.prefix = "transformer." if w.has("transformer.word_embeddings.weight") else ""
        self.embed = VocabParallelEmbedding(w, self.prefix + "word_embeddings.weight", shard, cfg.vocab_size)
        self.embed_norm = self._norm(w, "word_embeddings_layernorm")
        self.final_norm = self._norm(w, "ln_f")
        tied = self.embed if cfg.tie_word_embeddings or not w.has("lm_head.weight") else None
        self.lm_head = ParallelLMHead(w, "lm_head", shard, cfg.vocab_size, tied)
        self.layers = [self._load_layer(w, i) for i in range(cfg.num_layers)]
        slopes = alibi_slopes(cfg.num_heads)[self.heads[0] : self.heads[1]]
        self.slopes = slopes.view(-1, 1, 1).to(device)  # [local heads, 1, 1]
        self.scale = 1.0 / math.sqrt(cfg.head_dim)  # transformers' inv_norm_factor (beta = 1)

    def _norm(self, w: WeightSource, name: str) -> LayerNorm:
        return LayerNorm(w, self.prefix + name, self.cfg.layer_norm_epsilon)

    def _load_layer(self, w: WeightSource, i: int) -> Layer:
        c, shard, heads = self.cfg, self.shard, self.heads
        attn, mlp = f"{self.prefix}h.{i}.self_attention.", f"{self.prefix}h.{i}.mlp."
        return Layer(
            input_norm=self._norm(w, f"h.{i}.input_layernorm"),
            qkv=ColumnParallelLinear(w, attn + "query_key_value", shard, heads, 3 * c.head_dim, bias=True),
            o=RowParallelLinear(w, attn + "dense", shard, heads, c.head_dim, bias=True),
            post_norm=self._norm(w, f"h.{i}.post_attention_layernorm"),
            up=ColumnParallelLinear(w, mlp + "dense_h_to_4h", shard, 4 * c.hidden_size, bias=True),
            down=RowParallelLinear(w, mlp + "dense_4h_to_h", shard, 4 * c.hidden_size, bias=True),
        )

    def _alibi(self, rel: torch.Tensor) -> torch.Tensor:
        """Relative positions [..., q, k] -> float32 biases [..., local heads, q, k]."""
        return rel.unsqueeze(-3).float() * self.slopes

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor | None:
        """Run the step's flat tokens (see ``tgi_zmq.step``); return float32 logits of ``logit_rows``.

        With tensor parallelism only rank 0 gets the logits (None on the other ranks).
        """
        c, meta = self.cfg, batch.attention
        meta.add_position_bias(self._alibi)
        x = self.embed_norm(self.embed(batch.input_ids))
        for i, layer in enumerate(self.layers):
            h = layer.input_norm(x)
            residual = h if c.residual_post_layernorm else x
            q, k, v = layer.qkv(h).view(-1, self.num_heads, 3, c.head_dim).unbind(2)
            attn = paged_attention(q, k, v, cache.k[i], cache.v[i], meta, self.scale)
            x = residual + layer.o(attn.flatten(1))
            h = layer.post_norm(x)
            residual = h if c.residual_post_layernorm else x
            # transformers' bloom_gelu_forward is the tanh GELU (its sqrt(2/pi) rounded to 8 digits)
            x = residual + layer.down(F.gelu(layer.up(h), approximate="tanh"))
        return self.lm_head(self.final_norm(x[batch.logit_rows]))
