"""The layers against plain torch: one rank computes F.linear / F.embedding, and the ranks' slices of
a split, computed here in one process without torch.distributed, combine to the whole result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tgi_zmq.checkpoint.safetensors import SafetensorsWeights
from tgi_zmq.layers import (
    ColumnParallelLinear,
    LayerNorm,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightSource,
)
from tgi_zmq.parallel import Shard

HIDDEN, UNITS, VOCAB, HEAD_DIM = 6, 7, 11, 3  # odd sizes: uneven splits over 2 ranks


class LocalShard(Shard):
    """A rank of a split computed in this process: its collectives return this rank's own part."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        return logits


def ranks(world: int = 2) -> list[Shard]:
    return [LocalShard(r, world) for r in range(world)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict:
    """The tensors of a small checkpoint, saved in the folder ``ckpt["folder"]``."""
    torch.manual_seed(0)
    t = {
        "up.weight": torch.randn(UNITS, HIDDEN),
        "up.bias": torch.randn(UNITS),
        "gate.weight": torch.randn(UNITS, HIDDEN),
        "down.weight": torch.randn(HIDDEN, UNITS),
        "down.bias": torch.randn(HIDDEN),
        "embed.weight": torch.randn(VOCAB, HIDDEN),
        "head.weight": torch.randn(VOCAB, HIDDEN),
        "norm.weight": torch.randn(HIDDEN),
        "norm.bias": torch.randn(HIDDEN),
        "o.weight": torch.randn(HIDDEN, 4 * HEAD_DIM),
        "int8.qweight": torch.randint(-127, 128, (UNITS, HIDDEN), dtype=torch.int8),
        "int8.scale": torch.rand(UNITS, 1),
    }
    for kv_heads in (1, 2, 4):
        t[f"q{kv_heads}.weight"] = torch.randn(4 * HEAD_DIM, HIDDEN)
        t[f"k{kv_heads}.weight"] = torch.randn(kv_heads * HEAD_DIM, HIDDEN)
        t[f"v{kv_heads}.weight"] = torch.randn(kv_heads * HEAD_DIM, HIDDEN)
    folder = tmp_path_factory.mktemp("ckpt")
    save_file(t, folder / "model.safetensors")
    t["folder"] = folder
    return t


def weights(ckpt) -> SafetensorsWeights:
    return SafetensorsWeights(ckpt["folder"], torch.float32, torch.device("cpu"))


X = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))


def test_one_rank_is_plain_torch(ckpt):
    w, one = weights(ckpt), Shard()
    up = ColumnParallelLinear(w, "up", one, UNITS, bias=True)
    # few rows of x go through our gemv (another summation order than torch's): close, not equal
    torch.testing.assert_close(up(X), F.linear(X, ckpt["up.weight"], ckpt["up.bias"]))
    h = torch.randn(5, UNITS)
    down = RowParallelLinear(w, "down", one, UNITS, bias=True)
    torch.testing.assert_close(down(h), F.linear(h, ckpt["down.weight"], ckpt["down.bias"]))
    ids = torch.tensor([0, 3, 10, 3])
    embed = VocabParallelEmbedding(w, "embed.weight", one, VOCAB)
    assert torch.equal(embed(ids), F.embedding(ids, ckpt["embed.weight"]))
    torch.testing.assert_close(ParallelLMHead(w, "head", one, VOCAB)(X), F.linear(X, ckpt["head.weight"]))
    assert ParallelLMHead(w, "head", one, VOCAB, tied=embed).weight is embed.weight
    expected = F.layer_norm(X, (HIDDEN,), ckpt["norm.weight"], ckpt["norm.bias"], 1e-5)
    assert torch.equal(LayerNorm(w, "norm", 1e-5)(X), expected)
    rms = X * torch.rsqrt(X.pow(2).mean(-1, keepdim=True) + 1e-6) * ckpt["norm.weight"]
    torch.testing.assert_close(RMSNorm(w, "norm.weight", 1e-6)(X), rms)


def test_column_then_row_split_sums_to_the_whole(ckpt):
    """An MLP over 2 ranks: each computes its units of up (no communication), then its part of down;
    the sum of the parts (the all-reduce) is the whole, with the bias added once (rank 0)."""
    whole = F.linear(F.relu(F.linear(X, ckpt["up.weight"], ckpt["up.bias"])), ckpt["down.weight"])
    whole = whole + ckpt["down.bias"]
    ups = [ColumnParallelLinear(weights(ckpt), "up", s, UNITS, bias=True) for s in ranks()]
    downs = [RowParallelLinear(weights(ckpt), "down", s, UNITS, bias=True) for s in ranks()]
    assert [u.weight.shape[0] for u in ups] == [4, 3]
    hidden = [up(X) for up in ups]
    torch.testing.assert_close(torch.cat(hidden, -1), F.linear(X, ckpt["up.weight"], ckpt["up.bias"]))
    torch.testing.assert_close(sum(d(F.relu(h)) for d, h in zip(downs, hidden, strict=True)), whole)


def test_a_row_parallel_bias_is_held_by_rank_0_only(ckpt):
    """Rank 1 does not read it, yet it is not reported as a tensor the model left unused."""
    for s in ranks():
        w = weights(ckpt)
        layer = RowParallelLinear(w, "down", s, UNITS, bias=True)
        assert (layer.bias is not None) == (s.rank == 0)
        assert {"down.weight", "down.bias"} <= w.used


def test_merged_gate_up_is_one_matmul_split_per_rank(ckpt):
    for s in ranks():
        layer = MergedColumnParallelLinear(weights(ckpt), ["gate", "up"], s, UNITS)
        lo, hi = s.split(UNITS)
        gate, up = layer.split(layer(X))
        torch.testing.assert_close(gate, F.linear(X, ckpt["gate.weight"][lo:hi]))
        torch.testing.assert_close(up, F.linear(X, ckpt["up.weight"][lo:hi]))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_qkv_split_by_heads_replicates_kv_heads_when_fewer_than_ranks(ckpt, kv_heads):
    """4 query heads over 2 ranks: with 1 KV head both ranks hold it; the output projection takes
    the columns of each rank's query heads, and the ranks' parts sum to the whole."""
    names = [f"{n}{kv_heads}" for n in "qkv"]
    q, k, v = (F.linear(X, ckpt[f"{n}.weight"]).view(5, -1, HEAD_DIM) for n in names)
    o_parts = []
    for s in ranks():
        layer = QKVParallelLinear(weights(ckpt), names, s, 4, kv_heads, HEAD_DIM)
        (q_lo, q_hi), (kv_lo, kv_hi) = s.heads(4, kv_heads)
        assert (layer.num_heads, layer.num_kv_heads) == (2, max(kv_heads // 2, 1))
        mine = layer.split(layer(X))
        ranges = [(q_lo, q_hi), (kv_lo, kv_hi), (kv_lo, kv_hi)]
        for got, full, (lo, hi) in zip(mine, (q, k, v), ranges, strict=True):
            torch.testing.assert_close(got, full[:, lo:hi])
        o = RowParallelLinear(weights(ckpt), "o", s, layer.q_heads, HEAD_DIM)
        o_parts.append(o(mine[0].flatten(1)))
    if kv_heads == 1:
        assert [s.heads(4, 1)[1] for s in ranks()] == [(0, 1), (0, 1)]
    torch.testing.assert_close(sum(o_parts), F.linear(q.flatten(1), ckpt["o.weight"]))


def test_vocab_split_embedding_sums_and_lm_head_concatenates(ckpt):
    ids = torch.tensor([0, 5, 6, 10, 5])
    embeds = [VocabParallelEmbedding(weights(ckpt), "embed.weight", s, VOCAB) for s in ranks()]
    torch.testing.assert_close(sum(e(ids) for e in embeds), F.embedding(ids, ckpt["embed.weight"]))
    heads = [ParallelLMHead(weights(ckpt), "head", s, VOCAB) for s in ranks()]
    torch.testing.assert_close(torch.cat([h(X) for h in heads], -1), F.linear(X, ckpt["head.weight"]))
    tied = [
        ParallelLMHead(weights(ckpt), "head", s, VOCAB, tied=e) for s, e in zip(ranks(), embeds, strict=True)
    ]
    torch.testing.assert_close(torch.cat([h(X) for h in tied], -1), F.linear(X, ckpt["embed.weight"]))


class Int8Rows:
    """A weight-only int8 method (one scale per output row): what the seam is for. Its integers are
    read as stored (``WeightSource.get(dtype=...)``), not cast to the model's dtype."""

    def load(self, layer, weights: WeightSource, parts, cols) -> None:
        (prefix, rows), *_ = parts
        layer.qweight = weights.get(f"{prefix}.qweight", rows, cols, dtype=torch.int8)
        layer.scale = weights.get(f"{prefix}.scale", rows)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.qweight.to(x.dtype) * layer.scale, layer.bias)


def test_a_linear_method_chooses_how_weights_are_stored(ckpt):
    dense = ckpt["int8.qweight"].float() * ckpt["int8.scale"]
    for s in ranks():
        layer = ColumnParallelLinear(weights(ckpt), "int8", s, UNITS, method=Int8Rows())
        lo, hi = s.split(UNITS)
        assert layer.qweight.dtype == torch.int8 and not hasattr(layer, "weight")
        torch.testing.assert_close(layer(X), F.linear(X, dense[lo:hi]))
