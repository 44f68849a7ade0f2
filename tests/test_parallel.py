"""Tensor parallelism: slices, head splits, and 2 ranks (gloo, one process each) giving 1 rank's tokens."""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers import ARCHITECTURES, hf_greedy, run_engine
from tgi_zmq.messages import SamplingParams
from tgi_zmq.models import load_model, weight_bytes
from tgi_zmq.parallel import Shard


def test_split_covers_every_unit_once():
    for n in (1, 5, 9, 49152):
        for world in (1, 2, 3, 4):
            ranges = [Shard(r, world).split(n) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_heads_follow_their_kv_group_or_replicate_it():
    # SmolLM2: 9 query heads over 3 KV heads, 2 ranks: KV heads 2 + 1, query heads 6 + 3.
    assert [Shard(r, 2).heads(9, 3) for r in range(2)] == [((0, 6), (0, 2)), ((6, 9), (2, 3))]
    # One KV head, 2 ranks: both keep it, each takes half of the query heads.
    assert [Shard(r, 2).heads(4, 1) for r in range(2)] == [((0, 2), (0, 1)), ((2, 4), (0, 1))]
    with pytest.raises(ValueError, match="cannot split 3 heads"):
        Shard(0, 2).heads(3, 1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_rank_holds_about_half_of_the_weights(arch, tiny_models):
    folder = tiny_models(arch, vocab_size=4096)
    whole = weight_bytes(load_model(folder, "float32", "cpu"))
    halves = [weight_bytes(load_model(folder, "float32", "cpu", Shard(r, 2))) for r in range(2)]
    print(f"{arch}: whole {whole} bytes, ranks {halves}")
    assert all(0.45 * whole < h < 0.56 * whole for h in halves)


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "llama-biases"])
def test_two_ranks_give_the_tokens_of_one(arch, tiny_models, two_ranks):
    # llama-biases: Llama with attention and MLP biases (the row-parallel ones live on rank 0 only)
    biases = dict(attention_bias=True, mlp_bias=True) if arch == "llama-biases" else {}
    folder = tiny_models(arch.removesuffix("-biases"), **biases)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(2, 30))] for _ in range(5)]
    params = [SamplingParams()] * 3 + [SamplingParams(do_sample=True, seed=s) for s in range(2)]
    sharded = two_ranks.run(folder, prompts, params)
    single, _ = run_engine(folder, prompts, params, 8, num_blocks=40, max_step_tokens=16, overlap=True)
    assert sharded == single
    assert sharded[:3] == [hf_greedy(folder, p, 8) for p in prompts[:3]]


def test_one_shard_never_touches_torch_distributed(tiny_models):
    from tgi_zmq.model_runner import ModelRunner

    runner = ModelRunner(str(tiny_models("llama")), "float32", "cpu", 8, 4)
    assert runner.shard.world == 1 and not torch.distributed.is_initialized()
