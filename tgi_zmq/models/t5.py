"""T5 (encoder-decoder) in plain torch: the decoder runs over the paged KV cache.

What differs from the decoder-only models:
- The prompt goes through the encoder once per request, in the step that runs the decoder's
  first token. Each decoder layer's cross-attention K/V of the encoder output are written into
  the request's ``cross_blocks`` (pages of the same cache, see ``tgi_zmq.scheduler``); later
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

from tgi_zmq.attention import AttentionMetadata, KVCache, paged_attention, store_kv
from tgi_zmq.models.base import PagedModel
from tgi_zmq.models.weights import Weights
from tgi_zmq.parallel import Shard, embed

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
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
    model_type: str = "t5"

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
            decoder_start_token_id=cfg.get("decoder_start_token_id") or 0,
        )


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
class Attention:
    norm: torch.Tensor
    qkv: torch.Tensor  # q|k|v fused: self-attention projects once; cross-attention uses ``q`` and ``kv``
    o: torch.Tensor

    @property
    def q(self) -> torch.Tensor:
        return self.qkv[: len(self.qkv) // 3]

    @property
    def kv(self) -> torch.Tensor:
        return self.qkv[len(self.qkv) // 3 :]


@dataclasses.dataclass
class Block:
    self_attn: Attention
    cross_attn: Attention | None  # decoder blocks only
    ff_norm: torch.Tensor
    wi: torch.Tensor  # gated: wi_0|wi_1 fused
    wo: torch.Tensor


class T5Model(PagedModel):
    """With tensor parallelism (``shard``), this rank's heads, feed-forward units and vocabulary slice."""

    def __init__(
        self, cfg: T5Config, weights: Weights, dtype: torch.dtype, device: torch.device, shard: Shard
    ):
        super().__init__(cfg, dtype, device, shard)
        (lo, hi), _ = shard.heads(cfg.num_heads, cfg.num_kv_heads)
        self.num_heads = self.num_kv_heads = hi - lo
        heads = shard.rows((lo, hi), 1)  # columns of the relative-bias tables [buckets, heads]
        self.head_rows = shard.rows((lo, hi), cfg.head_dim)
        get = weights.get
        vocab = shard.part(cfg.vocab_size)
        self.embed = get("shared.weight", rows=vocab)
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if weights.has(alias):
                weights.used.add(alias)  # saved copies of the shared embedding
        self.lm_head = self.embed if cfg.tie_word_embeddings else get("lm_head.weight", rows=vocab)
        self.encoder = [self._load_block(weights, "encoder", i) for i in range(cfg.num_encoder_layers)]
        self.decoder = [self._load_block(weights, "decoder", i) for i in range(cfg.num_layers)]
        self.encoder_norm = get("encoder.final_layer_norm.weight")
        self.decoder_norm = get("decoder.final_layer_norm.weight")
        bias_name = "{}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"  # [buckets, heads]
        self.encoder_bias = get(bias_name.format("encoder"), cols=heads).float()
        self.decoder_bias = get(bias_name.format("decoder"), cols=heads).float()

    def _load_block(self, w: Weights, stack: str, i: int) -> Block:
        p = f"{stack}.block.{i}.layer."
        decoder = stack == "decoder"
        rows, units = self.head_rows, self.shard.part(self.cfg.d_ff)

        def attention(layer: str, name: str) -> Attention:
            a = f"{p}{layer}.{name}."
            return Attention(
                norm=w.get(f"{p}{layer}.layer_norm.weight"),
                qkv=torch.cat([w.get(f"{a}{n}.weight", rows=rows) for n in "qkv"]),
                o=w.get(a + "o.weight", cols=rows),
            )

        ff = f"{p}{2 if decoder else 1}."
        wi = ["wi_0", "wi_1"] if self.cfg.gated else ["wi"]
        return Block(
            self_attn=attention("0", "SelfAttention"),
            cross_attn=attention("1", "EncDecAttention") if decoder else None,
            ff_norm=w.get(ff + "layer_norm.weight"),
            wi=torch.cat([w.get(f"{ff}DenseReluDense.{n}.weight", rows=units) for n in wi]),
            wo=w.get(ff + "DenseReluDense.wo.weight", cols=units),
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(variance + self.cfg.eps)).to(x.dtype)

    def _position_bias(self, table: torch.Tensor, bidirectional: bool):
        c = self.cfg

        def bias(rel: torch.Tensor) -> torch.Tensor:
            buckets = relative_bucket(rel, bidirectional, c.num_buckets, c.max_distance)
            return F.embedding(buckets, table).movedim(-1, -3)  # [..., q, k, heads] -> [..., heads, q, k]

        return bias

    def _feed_forward(self, x: torch.Tensor, block: Block) -> torch.Tensor:
        h = F.linear(self._norm(x, block.ff_norm), block.wi)
        act = ACTIVATIONS[self.cfg.activation]
        h = act(h[..., : h.shape[-1] // 2]) * h[..., h.shape[-1] // 2 :] if self.cfg.gated else act(h)
        return x + self.shard.all_reduce(F.linear(h, block.wo))

    @torch.inference_mode()
    def forward(
        self, step: dict[str, torch.Tensor], cache: KVCache, meta: AttentionMetadata, logit_rows: torch.Tensor
    ) -> torch.Tensor | None:
        """Encode the new prompts (filling their cross-attention pages), then run the decoder tokens.

        With tensor parallelism only rank 0 gets the logits (None on the other ranks).
        """
        c, shard = self.cfg, self.shard
        if step["encoder_ids"].numel():
            self._encode(step, cache)
        block_size = cache.k[0].shape[1]
        cross = AttentionMetadata.for_pages(
            step["query_start"], step["cross_lens"], step["cross_tables"], None, block_size, causal=False
        )
        meta.add_position_bias(self._position_bias(self.decoder_bias, bidirectional=False))
        x = embed(step["input_ids"], self.embed, shard, c.vocab_size)
        for i, block in enumerate(self.decoder):
            q, k, v = self._qkv(x, block.self_attn)
            attn = paged_attention(q, k, v, cache.k[i], cache.v[i], meta, 1.0)
            x = x + shard.all_reduce(F.linear(attn.flatten(1), block.self_attn.o))
            cross_q = F.linear(self._norm(x, block.cross_attn.norm), block.cross_attn.q).view(q.shape)
            attn = paged_attention(cross_q, None, None, cache.k[i], cache.v[i], cross, 1.0)
            x = x + shard.all_reduce(F.linear(attn.flatten(1), block.cross_attn.o))
            x = self._feed_forward(x, block)
        h = self._norm(x[logit_rows], self.decoder_norm)
        if c.tie_word_embeddings:
            h = h * c.d_model**-0.5
        return shard.gather_vocab(F.linear(h, self.lm_head).float(), c.vocab_size)

    def _qkv(self, x: torch.Tensor, attn: Attention) -> tuple[torch.Tensor, ...]:
        qkv = F.linear(self._norm(x, attn.norm), attn.qkv)
        return qkv.view(-1, 3 * self.num_heads, self.cfg.head_dim).chunk(3, dim=1)

    def _kv(self, h: torch.Tensor, attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = F.linear(h, attn.kv).view(-1, 2 * self.num_heads, self.cfg.head_dim).chunk(2, dim=1)
        return k, v

    def _encode(self, step: dict[str, torch.Tensor], cache: KVCache) -> None:
        """Run the encoder over each new prompt; store every decoder layer's cross K/V in the pages."""
        c = self.cfg
        bounds = step["encoder_start"].tolist()
        bias = self._position_bias(self.encoder_bias, bidirectional=True)
        masks = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            pos = torch.arange(hi - lo, device=self.device)
            masks.append(bias(pos.view(1, -1) - pos.view(-1, 1)).unsqueeze(0).to(self.dtype))
        x = embed(step["encoder_ids"], self.embed, self.shard, c.vocab_size)
        for block in self.encoder:
            q, k, v = self._qkv(x, block.self_attn)
            attn = torch.empty_like(q)
            for (lo, hi), mask in zip(zip(bounds, bounds[1:], strict=False), masks, strict=True):
                seq = [t[lo:hi].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
                out = F.scaled_dot_product_attention(*seq, attn_mask=mask, scale=1.0)
                attn[lo:hi] = out.squeeze(0).transpose(0, 1)
            x = x + self.shard.all_reduce(F.linear(attn.flatten(1), block.self_attn.o))
            x = self._feed_forward(x, block)
        encoded = self._norm(x, self.encoder_norm)
        for i, block in enumerate(self.decoder):
            k, v = self._kv(encoded, block.cross_attn)
            store_kv(k, v, cache.k[i], cache.v[i], step["encoder_slots"])
