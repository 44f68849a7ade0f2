"""BLOOM (bigscience/bloom-*) in plain torch over the paged KV cache.

What differs from Llama:
- no rotary embeddings: ALiBi adds ``slope_h * (key_pos - query_pos)`` to head h's scores,
  folded into the step's attention masks once per forward (``add_position_bias``). That is
  transformers' ``slope_h * key_pos`` shifted by a per-query constant (same softmax), and keeps
  the biases of near tokens small, which bfloat16 masks need;
- LayerNorms with biases everywhere, plus one right after the word embeddings;
- the fused ``query_key_value`` is stored per head ([heads, 3, head_dim] rows): its rows are
  regrouped at load time into [q | k | v] so one matmul and a split give the three;
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

from tgi_zmq.attention import AttentionMetadata, KVCache, paged_attention
from tgi_zmq.models.base import PagedModel
from tgi_zmq.models.weights import Weights
from tgi_zmq.parallel import Shard, embed


@dataclasses.dataclass(frozen=True)
class BloomConfig:
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
    input_norm: tuple[torch.Tensor, torch.Tensor]
    qkv: torch.Tensor
    qkv_bias: torch.Tensor
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: tuple[torch.Tensor, torch.Tensor]
    up: torch.Tensor
    up_bias: torch.Tensor
    down: torch.Tensor
    down_bias: torch.Tensor | None


class BloomModel(PagedModel):
    """With tensor parallelism (``shard``), this rank's heads, MLP units and vocabulary slice."""

    def __init__(
        self, cfg: BloomConfig, weights: Weights, dtype: torch.dtype, device: torch.device, shard: Shard
    ):
        super().__init__(cfg, dtype, device, shard)
        (lo, hi), _ = shard.heads(cfg.num_heads, cfg.num_kv_heads)
        self.num_heads = self.num_kv_heads = hi - lo
        self.qkv_rows = shard.rows((lo, hi), 3 * cfg.head_dim)  # per head: its q, k and v rows
        self.o_cols = shard.rows((lo, hi), cfg.head_dim)
        w = weights
        self.prefix = "transformer." if w.has("transformer.word_embeddings.weight") else ""
        vocab = shard.part(cfg.vocab_size)
        self.embed = w.get(self.prefix + "word_embeddings.weight", rows=vocab)
        self.embed_norm = self._norm(w, "word_embeddings_layernorm")
        self.final_norm = self._norm(w, "ln_f")
        own_head = not cfg.tie_word_embeddings and w.has("lm_head.weight")
        self.lm_head = w.get("lm_head.weight", rows=vocab) if own_head else self.embed
        self.layers = [self._load_layer(w, i) for i in range(cfg.num_layers)]
        self.slopes = alibi_slopes(cfg.num_heads)[lo:hi].view(-1, 1, 1)  # [local heads, 1, 1]
        self.scale = 1.0 / math.sqrt(cfg.head_dim)  # transformers' inv_norm_factor (beta = 1)

    def _norm(self, w: Weights, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return w.get(f"{self.prefix}{name}.weight"), w.get(f"{self.prefix}{name}.bias")

    def _load_layer(self, w: Weights, i: int) -> Layer:
        c = self.cfg
        p = f"{self.prefix}h.{i}."
        attn, mlp = p + "self_attention.", p + "mlp."
        qkv_rows, units = self.qkv_rows, self.shard.part(4 * c.hidden_size)

        def per_head_to_qkv(t: torch.Tensor) -> torch.Tensor:
            """Rows [heads, 3, head_dim] -> [3, heads, head_dim]: q rows, then k rows, then v rows."""
            return t.view(self.num_heads, 3, c.head_dim, -1).transpose(0, 1).reshape(t.shape).contiguous()

        return Layer(
            input_norm=self._norm(w, f"h.{i}.input_layernorm"),
            qkv=per_head_to_qkv(w.get(attn + "query_key_value.weight", rows=qkv_rows)),
            qkv_bias=per_head_to_qkv(w.get(attn + "query_key_value.bias", rows=qkv_rows)),
            o=w.get(attn + "dense.weight", cols=self.o_cols),
            o_bias=w.get_row_bias(attn + "dense.bias", self.shard.rank),
            post_norm=self._norm(w, f"h.{i}.post_attention_layernorm"),
            up=w.get(mlp + "dense_h_to_4h.weight", rows=units),
            up_bias=w.get(mlp + "dense_h_to_4h.bias", rows=units),
            down=w.get(mlp + "dense_4h_to_h.weight", cols=units),
            down_bias=w.get_row_bias(mlp + "dense_4h_to_h.bias", self.shard.rank),
        )

    def _layer_norm(self, x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (self.cfg.hidden_size,), norm[0], norm[1], self.cfg.layer_norm_epsilon)

    def _alibi(self, rel: torch.Tensor) -> torch.Tensor:
        """Relative positions [..., q, k] -> float32 biases [..., local heads, q, k]."""
        return rel.unsqueeze(-3).float() * self.slopes.to(rel.device)

    @torch.inference_mode()
    def forward(
        self, step: dict[str, torch.Tensor], cache: KVCache, meta: AttentionMetadata, logit_rows: torch.Tensor
    ) -> torch.Tensor | None:
        """Run the step's flat tokens (see ``tgi_zmq.step``); return float32 logits of ``logit_rows``.

        With tensor parallelism only rank 0 gets the logits (None on the other ranks).
        """
        c, shard = self.cfg, self.shard
        meta.add_position_bias(self._alibi)
        x = self._layer_norm(embed(step["input_ids"], self.embed, shard, c.vocab_size), self.embed_norm)
        for i, layer in enumerate(self.layers):
            h = self._layer_norm(x, layer.input_norm)
            residual = h if c.residual_post_layernorm else x
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.view(-1, 3, self.num_heads, c.head_dim).unbind(1)
            attn = paged_attention(q, k, v, cache.k[i], cache.v[i], meta, self.scale)
            x = residual + shard.all_reduce(F.linear(attn.flatten(1), layer.o, layer.o_bias))
            h = self._layer_norm(x, layer.post_norm)
            residual = h if c.residual_post_layernorm else x
            # transformers' bloom_gelu_forward is the tanh GELU (its sqrt(2/pi) rounded to 8 digits)
            up = F.gelu(F.linear(h, layer.up, layer.up_bias), approximate="tanh")
            x = residual + shard.all_reduce(F.linear(up, layer.down, layer.down_bias))
        h = self._layer_norm(x[logit_rows], self.final_norm)
        return shard.gather_vocab(F.linear(h, self.lm_head).float(), c.vocab_size)
