"""T5 (encoder-decoder) in plain torch: the decoder runs over the paged KV cache.

What differs from the decoder-only models:
- The prompt goes through the encoder once per request, in the step that runs the decoder's
  first token. Each decoder layer's cross-attention K/V of the encoder output are written into
  the request's ``cross_blocks`` (pages of the same cache, see ``tgi_zmq.policy``); later
  steps only read them.
- Positions are relative: a learned bias per head and log-spaced distance bucket, added to the
  scores (bidirectional in the encoder, causal in the decoder; the first layer's table serves
  every layer). Scores are not scaled by 1/sqrt(d).
- RMS norms without mean, a ReLU or gated-GELU feed-forward, and with tied embeddings the
  decoder output is scaled by d_model^-0.5 before the LM head.

Tensor parallelism splits every attention (and the relative-bias tables) by heads and the
feed-forward by units, as for Llama; every rank runs the encoder with its heads and stores its
heads' cross-attention K/V in its own cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from tgi_zmq.attention import KVCache, paged_attention, store_kv
from tgi_zmq.forward_batch import EncoderBatch, ForwardBatch
from tgi_zmq.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightSource,
)
from tgi_zmq.models.base import ModelConfig, PagedModel
from tgi_zmq.parallel import Shard

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config(ModelConfig):
    d_model: int
    d_ff: int
    vocab_size: int
    num_heads: int
    head_dim: int
    num_encoder_layers: int
    num_layers: int  # decoder layers: the ones that hold KV pages
    num_buckets: int
    max_distance: int
    eps: float
    activation: str
    gated: bool
    tie_word_embeddings: bool
    decoder_start_token_id: int

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> T5Config:
        proj = cfg.get("feed_forward_proj", "relu")
        act = proj.split("-")[-1]
        return cls(
            d_model=cfg["d_model"],
            d_ff=cfg["d_ff"],
            vocab_size=cfg["vocab_size"],
            num_heads=cfg["num_heads"],
            head_dim=cfg["d_kv"],
            num_encoder_layers=cfg["num_layers"],
            num_layers=cfg.get("num_decoder_layers") or cfg["num_layers"],
            num_buckets=cfg.get("relative_attention_num_buckets", 32),
            max_distance=cfg.get("relative_attention_max_distance", 128),
            eps=cfg.get("layer_norm_epsilon", 1e-6),
            activation="gelu_new" if proj == "gated-gelu" else act,
            gated=proj.startswith("gated-"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            decoder_start_token_id=cls.decoder_start(cfg),
        )

    @classmethod
    def decoder_start(cls, hf: dict[str, Any]) -> int:
        """config.json's ``decoder_start_token_id``, else the pad token (T5 starts from it), else 0."""
        start = hf.get("decoder_start_token_id")
        return start if isinstance(start, int) else hf.get("pad_token_id") or 0


def relative_bucket(
    rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position ``key - query``: exact when near, log-spaced when far."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(dist.float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(dist < exact, dist, far)


@dataclasses.dataclass
class SelfAttention:
    norm: RMSNorm
    qkv: QKVParallelLinear
    o: RowParallelLinear


@dataclasses.dataclass
class CrossAttention:
    """Queries from the decoder; keys and values from the encoder output (once per request)."""

    norm: RMSNorm
    q: ColumnParallelLinear
    kv: MergedColumnParallelLinear
    o: RowParallelLinear


@dataclasses.dataclass
class Block:
    self_attn: SelfAttention
    cross_attn: CrossAttention | None  # decoder blocks only
    ff_norm: RMSNorm
    wi: MergedColumnParallelLinear  # gated: wi_0|wi_1
    wo: RowParallelLinear


class T5Model(PagedModel):
    """With tensor parallelism (``shard``), this rank's heads, feed-forward units and vocabulary slice."""

    def __init__(
        self, cfg: T5Config, weights: WeightSource, dtype: torch.dtype, device: torch.device, shard: Shard
    ):
        super().__init__(cfg, dtype, device, shard)
        self.heads, _ = shard.heads(cfg.num_heads, cfg.num_kv_heads)
        self.num_heads = self.num_kv_heads = self.heads[1] - self.heads[0]
        self.embed = VocabParallelEmbedding(weights, "shared.weight", shard, cfg.vocab_size)
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            weights.mark_used(alias)  # saved copies of the shared embedding
        tied = self.embed if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(weights, "lm_head", shard, cfg.vocab_size, tied)
        self.encoder = [self._load_block(weights, "encoder", i) for i in range(cfg.num_encoder_layers)]
        self.decoder = [self._load_block(weights, "decoder", i) for i in range(cfg.num_layers)]
        self.encoder_norm = RMSNorm(weights, "encoder.final_layer_norm.weight", cfg.eps)
        self.decoder_norm = RMSNorm(weights, "decoder.final_layer_norm.weight", cfg.eps)
        bias_name = "{}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"  # [buckets, heads]
        heads = shard.rows(self.heads, 1)  # this rank's columns of the tables
        self.encoder_bias = weights.get(bias_name.format("encoder"), cols=heads).float()
        self.decoder_bias = weights.get(bias_name.format("decoder"), cols=heads).float()

    def _load_block(self, w: WeightSource, stack: str, i: int) -> Block:
        c, shard, heads = self.cfg, self.shard, self.heads
        p = f"{stack}.block.{i}.layer."
        attn, cross = f"{p}0.SelfAttention.", f"{p}1.EncDecAttention."
        qkv = QKVParallelLinear(w, [attn + n for n in "qkv"], shard, c.num_heads, c.num_kv_heads, c.head_dim)
        self_attn = SelfAttention(
            norm=RMSNorm(w, f"{p}0.layer_norm.weight", c.eps),
            qkv=qkv,
            o=RowParallelLinear(w, attn + "o", shard, qkv.q_heads, c.head_dim),
        )
        cross_attn = None
        if stack == "decoder":
            cross_attn = CrossAttention(
                norm=RMSNorm(w, f"{p}1.layer_norm.weight", c.eps),
                q=ColumnParallelLinear(w, cross + "q", shard, heads, c.head_dim),
                kv=MergedColumnParallelLinear(w, [cross + "k", cross + "v"], shard, heads, c.head_dim),
                o=RowParallelLinear(w, cross + "o", shard, heads, c.head_dim),
            )
        ff = f"{p}{1 if cross_attn is None else 2}."
        wi = ["wi_0", "wi_1"] if c.gated else ["wi"]
        return Block(
            self_attn=self_attn,
            cross_attn=cross_attn,
            ff_norm=RMSNorm(w, ff + "layer_norm.weight", c.eps),
            wi=MergedColumnParallelLinear(w, [f"{ff}DenseReluDense.{n}" for n in wi], shard, c.d_ff),
            wo=RowParallelLinear(w, ff + "DenseReluDense.wo", shard, c.d_ff),
        )

    def _position_bias(self, table: torch.Tensor, bidirectional: bool):
        c = self.cfg

        def bias(rel: torch.Tensor) -> torch.Tensor:
            buckets = relative_bucket(rel, bidirectional, c.num_buckets, c.max_distance)
            return F.embedding(buckets, table).movedim(-1, -3)  # [..., q, k, heads] -> [..., heads, q, k]

        return bias

    def _feed_forward(self, x: torch.Tensor, block: Block) -> torch.Tensor:
        h = block.wi.split(block.wi(block.ff_norm(x)))
        act = ACTIVATIONS[self.cfg.activation]
        return x + block.wo(act(h[0]) * h[1] if self.cfg.gated else act(h[0]))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor | None:
        """Encode the new prompts (filling their cross-attention pages), then run the decoder tokens.

        With tensor parallelism only rank 0 gets the logits (None on the other ranks).
        """
        c, encoder = self.cfg, batch.encoder
        if len(encoder.start) > 1:
            self._encode(encoder, cache)
        meta, cross = batch.attention, encoder.cross_attention
        meta.add_position_bias(self._position_bias(self.decoder_bias, bidirectional=False))
        x = self.embed(batch.input_ids)
        for i, block in enumerate(self.decoder):
            a = block.self_attn
            q, k, v = a.qkv.split(a.qkv(a.norm(x)))
            x = x + a.o(paged_attention(q, k, v, cache.k[i], cache.v[i], meta, 1.0).flatten(1))
            a = block.cross_attn
            q = a.q(a.norm(x)).view(q.shape)  # the keys and values are in the cross-attention pages
            x = x + a.o(paged_attention(q, None, None, cache.k[i], cache.v[i], cross, 1.0).flatten(1))
            x = self._feed_forward(x, block)
        h = self.decoder_norm(x[batch.logit_rows])
        if c.tie_word_embeddings:
            h = h * c.d_model**-0.5
        return self.lm_head(h)

    def _encode(self, encoder: EncoderBatch, cache: KVCache) -> None:
        """Run the encoder over each new prompt; store every decoder layer's cross K/V in the pages."""
        bounds = list(zip(encoder.start, encoder.start[1:], strict=False))  # host ints: no device reads
        bias = self._position_bias(self.encoder_bias, bidirectional=True)
        masks = []
        for lo, hi in bounds:
            pos = torch.arange(hi - lo, device=self.device)
            masks.append(bias(pos.view(1, -1) - pos.view(-1, 1)).unsqueeze(0).to(self.dtype))
        x = self.embed(encoder.ids)
        for block in self.encoder:
            a = block.self_attn
            q, k, v = a.qkv.split(a.qkv(a.norm(x)))
            attn = torch.empty_like(q)
            for (lo, hi), mask in zip(bounds, masks, strict=True):
                seq = [t[lo:hi].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
                out = F.scaled_dot_product_attention(*seq, attn_mask=mask, scale=1.0)
                attn[lo:hi] = out.squeeze(0).transpose(0, 1)
            x = x + a.o(attn.flatten(1))
            x = self._feed_forward(x, block)
        encoded = self.encoder_norm(x)
        for i, block in enumerate(self.decoder):
            kv = block.cross_attn.kv
            k, v = (t.view(-1, self.num_heads, self.cfg.head_dim) for t in kv.split(kv(encoded)))
            store_kv(k, v, cache.k[i], cache.v[i], encoder.slots)
