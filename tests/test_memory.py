"""KV-cache sizing: each rank's weights and KV heads, per-tensor dtypes, and the pool over N ranks."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import ARCHITECTURES
from tgi_zmq import memory
from tgi_zmq.memory import (
    ACTIVATION_RESERVE,
    kv_budget_tokens,
    kv_bytes_per_token,
    rank_memory,
    rank_weights_bytes,
    weights_bytes,
)
from tgi_zmq.models import load_model, read_config, weight_bytes
from tgi_zmq.parallel import Shard

GiB = 1 << 30


def llama_config(heads: int, kv_heads: int, layers: int = 2, head_dim: int = 16) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": heads * head_dim,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
    }


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_rank_is_sized_as_it_loads(arch, tiny_models):
    """The meta-device count is what the rank really holds, on 1, 2 and 4 ranks; only small buffers
    the model computes itself (BLOOM's ALiBi slopes) are left to the activation reserve."""
    folder = tiny_models(arch)
    for world in (1, 2, 4):
        for rank in range(world):
            shard = Shard(rank, world)
            loaded = weight_bytes(load_model(folder, "float32", "cpu", shard))
            assert 0 <= loaded - rank_weights_bytes(folder, "float32", shard) <= 64, (world, rank)


def test_one_rank_holds_the_whole_checkpoint_at_the_served_dtype(tiny_models):
    folder = tiny_models("llama")  # untied: every checkpoint tensor is loaded once
    assert rank_weights_bytes(folder, "float32", Shard()) == weights_bytes(folder, "float32")
    assert rank_weights_bytes(folder, "bfloat16", Shard()) == weights_bytes(folder, "bfloat16")
    assert weights_bytes(folder, "bfloat16") * 2 == weights_bytes(folder, "float32")


def test_ranks_split_the_weights(tiny_models):
    folder = tiny_models("llama", vocab_size=4096)
    whole = weights_bytes(folder, "float32")
    halves = [rank_weights_bytes(folder, "float32", Shard(r, 2)) for r in range(2)]
    assert all(0.45 * whole < h < 0.56 * whole for h in halves)


def test_a_tensor_counts_at_its_own_dtype_unless_it_is_cast(tmp_path):
    save_file(
        {
            "w": torch.zeros(10, 10, dtype=torch.float32),
            "h": torch.zeros(6, dtype=torch.bfloat16),
            "q": torch.zeros(8, 4, dtype=torch.int8),
            "idx": torch.zeros(3, dtype=torch.int64),
        },
        str(tmp_path / "model.safetensors"),
    )
    # Floating-point tensors are cast to the served dtype; integer ones keep their size.
    assert weights_bytes(tmp_path, "bfloat16") == 100 * 2 + 6 * 2 + 32 * 1 + 3 * 8
    assert weights_bytes(tmp_path, "float32") == 100 * 4 + 6 * 4 + 32 * 1 + 3 * 8
    assert weights_bytes(tmp_path, None) == 100 * 4 + 6 * 2 + 32 * 1 + 3 * 8  # as stored


def test_kv_bytes_follow_the_ranks_kv_heads():
    smol = llama_config(heads=9, kv_heads=3, layers=30, head_dim=64)
    per_head = 2 * 30 * 64 * 2  # K and V, 30 layers, 64 dims, bfloat16
    assert kv_bytes_per_token(smol, "bfloat16") == 3 * per_head
    # 3 KV heads over 2 ranks: 2 + 1.
    assert [kv_bytes_per_token(smol, "bfloat16", Shard(r, 2)) for r in range(2)] == [2 * per_head, per_head]
    # 2 KV heads over 4 ranks: each KV head is replicated on 2 ranks.
    gqa = llama_config(heads=8, kv_heads=2)
    one = 2 * 2 * 16 * 4
    assert [kv_bytes_per_token(gqa, "float32", Shard(r, 4)) for r in range(4)] == [one] * 4
    assert kv_bytes_per_token(gqa, "float32") == 2 * one


def fake_gpus(monkeypatch, free: dict[str, int]) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free))
    monkeypatch.setattr(memory, "free_memory", lambda device: free[device])


def test_each_gpu_rank_is_sized_from_its_own_device(tiny_models, monkeypatch):
    folder = tiny_models("llama")  # 2 KV heads: one per rank on 2 ranks
    hf = read_config(folder)
    fake_gpus(monkeypatch, {"cuda:0": 9 * GiB, "cuda:1": 5 * GiB})
    ranks = rank_memory(folder, hf, "float32", "cuda", 2)
    assert [r.device for r in ranks] == ["cuda:0", "cuda:1"]
    kv = kv_bytes_per_token(hf, "float32", Shard(1, 2))
    left = 5 * GiB - ranks[1].weights - ACTIVATION_RESERVE  # the GPU with less free memory decides
    assert kv_budget_tokens(folder, hf, "float32", "cuda", 0.5, 2) == int(left * 0.5) // kv


def test_two_gpus_hold_twice_the_tokens_of_one(tiny_models, monkeypatch):
    folder = tiny_models("llama")
    hf = read_config(folder)
    fake_gpus(monkeypatch, {"cuda:0": 8 * GiB, "cuda:1": 8 * GiB})
    one = kv_budget_tokens(folder, hf, "float32", "cuda", 0.9, 1)
    two = kv_budget_tokens(folder, hf, "float32", "cuda", 0.9, 2)
    assert 1.99 * one < two < 2.01 * one


def test_cpu_ranks_share_the_host_memory(tiny_models, monkeypatch):
    folder = tiny_models("llama")
    hf = read_config(folder)
    monkeypatch.setattr(memory, "free_memory", lambda device: {"cpu": 8 * GiB}[device])
    ranks = rank_memory(folder, hf, "float32", "cpu", 2)
    assert {r.device for r in ranks} == {"cpu"}
    left = 8 * GiB - sum(r.weights for r in ranks) - 2 * ACTIVATION_RESERVE
    expected = int(left * 0.3) // sum(r.kv_per_token for r in ranks)
    assert kv_budget_tokens(folder, hf, "float32", "cpu", 0.3, 2) == expected
    assert sum(r.kv_per_token for r in ranks) == kv_bytes_per_token(hf, "float32")  # no KV head replicated


def test_a_host_of_several_sizes_its_own_ranks_on_its_own_gpus(tiny_models, monkeypatch):
    folder = tiny_models("llama")  # --nnodes 2 --num-shard 4: node 0 holds ranks 0 and 1 on its 2 GPUs
    hf = read_config(folder)
    fake_gpus(monkeypatch, {"cuda:0": 8 * GiB, "cuda:1": 8 * GiB})
    ranks = rank_memory(folder, hf, "float32", "cuda", 4, here=range(2))
    assert [(r.rank, r.device) for r in ranks] == [(0, "cuda:0"), (1, "cuda:1")]
    assert ranks[0].weights == rank_memory(folder, hf, "float32", "cpu", 4)[0].weights  # a quarter's
    assert kv_budget_tokens(folder, hf, "float32", "cuda", 0.9, 4, here=range(2)) > 0


def test_more_gpu_ranks_than_gpus_are_refused(tiny_models, monkeypatch):
    folder = tiny_models("llama")
    fake_gpus(monkeypatch, {"cuda:0": 8 * GiB})
    with pytest.raises(
        ValueError, match=r"--num-shard 2 needs one GPU per rank \(2 on this host\); this machine has 1"
    ):
        kv_budget_tokens(folder, read_config(folder), "float32", "cuda", 0.9, 2)


def test_no_memory_left_gives_no_tokens(tiny_models, monkeypatch):
    folder = tiny_models("llama")
    monkeypatch.setattr(memory, "free_memory", lambda device: ACTIVATION_RESERVE)
    assert kv_budget_tokens(folder, read_config(folder), "float32", "cpu", 0.9) == 0


def test_a_model_that_cannot_be_built_on_meta_is_estimated(tiny_models, monkeypatch, caplog):
    folder = tiny_models("llama")

    def broken(*args, **kwargs):
        raise RuntimeError("no meta support")

    config = types.SimpleNamespace(from_hf=lambda hf: hf)
    monkeypatch.setattr("tgi_zmq.models.architecture", lambda hf: (config, broken))
    with caplog.at_level(logging.WARNING, logger="tgi_zmq.memory"):
        estimate = rank_weights_bytes(folder, "float32", Shard(0, 2))
    assert estimate == -(-weights_bytes(folder, "float32") // 2)
    assert "no meta support" in caplog.text
