"""Mixtures of experts (tgi_zmq/models/moe.py) beyond the generic checks of every architecture
(tests/test_models.py, test_parallel.py, test_memory.py, test_meta_device.py run Mixtral and Qwen3-MoE)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers import hf_greedy, run_engine, tiny_model
from tgi_zmq.messages import SamplingParams
from tgi_zmq.models import load_model, read_config
from tgi_zmq.models.moe import Expert, MoeConfig


def test_qwen3_moe_layers_and_routing_read_as_transformers_reads_them():
    hf = {"model_type": "qwen3_moe", "num_hidden_layers": 6, "num_attention_heads": 4, "hidden_size": 64}
    hf |= dict(intermediate_size=128, vocab_size=512, num_experts=8, num_experts_per_tok=2)
    hf |= dict(moe_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[3])
    cfg = MoeConfig.from_hf(hf)
    assert cfg.sparse_layers == {1, 5} and not cfg.norm_topk_prob and cfg.qk_norm
    assert cfg.expert_intermediate_size == 32 and cfg.intermediate_size == 128


def test_renormalised_qwen3_moe_with_dense_layers_between_matches_transformers(tmp_path):
    folder = tiny_model(
        "qwen3_moe",
        tmp_path,
        num_hidden_layers=3,
        decoder_sparse_step=2,
        mlp_only_layers=[],
        norm_topk_prob=True,
    )
    assert MoeConfig.from_hf(read_config(folder)).sparse_layers == {1}
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(2, 30))] for _ in range(4)]
    expected = [hf_greedy(folder, p, 8) for p in prompts]
    assert run_engine(folder, prompts, [SamplingParams()] * 4, 8)[0] == expected


@pytest.fixture(scope="module")
def mixtral(tiny_models):
    return load_model(tiny_models("mixtral"), "float32", "cpu")


def test_each_expert_runs_once_over_its_tokens(mixtral, monkeypatch):
    """A step of many tokens calls each expert once at most (its run of rows), never once per token."""
    calls: list[int] = []
    call = Expert.__call__

    def counting(self, x):
        calls.append(x.shape[0])
        return call(self, x)

    monkeypatch.setattr(Expert, "__call__", counting)
    block = mixtral.layers[0].moe
    block(torch.randn(40, 64))
    assert len(calls) <= len(block.experts) and sum(calls) == 40 * block.top_k


def test_the_device_path_gives_the_cpu_paths_sums(mixtral):
    """``_every_expert`` (no host synchronisation: GPU, meta) adds the same terms in the same order."""
    block = mixtral.layers[1].moe
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    weights, experts = block.route(x)
    assert experts.unique().numel() > 2  # the tokens do not all go to the same experts
    every, by_expert = block._every_expert(x, weights, experts), block._by_expert(x, weights, experts)
    torch.testing.assert_close(every, by_expert, rtol=1e-6, atol=1e-7)  # equal with the extension's gemv
