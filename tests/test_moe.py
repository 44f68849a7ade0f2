"""Mixtures of experts (tgi_zmq/models/moe.py) beyond the generic checks of every architecture
(tests/test_models.py, test_parallel.py, test_memory.py, test_meta_device.py run Mixtral and Qwen3-MoE)."""

from __future__ import annotations

import json
import random
import re
import shutil

import gguf as gguf_lib
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from tests.helpers import hf_greedy, run_engine, tiny_model
from tgi_zmq.checkpoint.gguf import _LAYER_NAMES, _MODEL_NAMES, _MOE_NAMES, GGUFWeights
from tgi_zmq.checkpoint.gguf_file import GGUF_JSON, open_gguf
from tgi_zmq.convert.gguf import moe_config
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


# ---------------------------------------------------------------------------------- GGUF (stacked experts)

GGUF_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}


def gguf_tensors(state: dict[str, torch.Tensor], arch: str) -> dict[str, tuple[np.ndarray, Q]]:
    """A Hugging Face MoE's tensors by GGUF's names as llama.cpp's converter writes them: experts stacked
    [experts, out, in] per projection, the router ffn_gate_inp, llama's q/k rows in GGML's rotary order."""
    block, stacked = _MOE_NAMES[arch]
    names = {v: k for k, v in _LAYER_NAMES.items()} | {f"{block}.gate": "ffn_gate_inp"}
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    out = {}
    for name, w in state.items():
        values = w.float().numpy()
        if m := re.fullmatch(rf"model\.layers\.(\d+)\.{block}\.experts\.(\d+)\.(\w+)\.weight", name):
            gguf = {v: k for k, v in stacked.items()}[m[3]]
            experts.setdefault((m[1], gguf), {})[int(m[2])] = values
            continue
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = 4 if ".q_proj." in name else 2  # tiny_model's
            values = values.reshape(heads, 2, -1, values.shape[1]).swapaxes(1, 2).reshape(values.shape)
        if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name):
            out[f"blk.{m[1]}.{names[m[2]]}.weight"] = (values, Q.F32)
        else:
            short = {v: k for k, v in _MODEL_NAMES.items()}[name.removesuffix(".weight")]
            out[f"{short}.weight"] = (values, Q.F32)
    for (layer, gguf), planes in experts.items():
        out[f"blk.{layer}.{gguf}.weight"] = (np.stack([planes[e] for e in sorted(planes)]), Q.F32)
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_a_gguf_of_stacked_experts_serves_the_checkpoints_tokens(arch, tiny_models, tmp_path):
    from safetensors.torch import load_file

    from tests.test_gguf_weights import write_gguf

    folder = tiny_models(arch)
    tensors = gguf_tensors(load_file(folder / "model.safetensors"), GGUF_ARCH[arch])
    path = write_gguf(tmp_path / "moe.gguf", tensors, GGUF_ARCH[arch])
    served = tmp_path / "served"  # as prepare_gguf_folder writes it, with the checkpoint's config
    served.mkdir()
    shutil.copy(folder / "config.json", served / "config.json")
    (served / GGUF_JSON).write_text(json.dumps({"gguf": str(path)}))
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(2, 30))] for _ in range(3)]
    params = [SamplingParams()] * 3
    assert run_engine(served, prompts, params, 8)[0] == run_engine(folder, prompts, params, 8)[0]


def test_a_quantized_stacked_tensor_gives_each_experts_blocks(tmp_path):
    from tests.test_gguf_weights import reference, write_gguf

    rng = np.random.default_rng(0)
    planes = rng.normal(0, 0.1, (4, 48, 64)).astype(np.float32)
    path = write_gguf(tmp_path / "q.gguf", {"blk.0.ffn_up_exps.weight": (encode(planes), Q.Q8_0)}, "qwen3moe")
    w = GGUFWeights(path, torch.float32, torch.device("cpu"))
    whole = reference(path, "blk.0.ffn_up_exps.weight").view(4, 48, 64)
    for e in range(4):
        name = f"model.layers.0.mlp.experts.{e}.up_proj.weight"
        assert torch.equal(w.get_quantized(name, rows=(8, 40)).dequantize(torch.float32), whole[e, 8:40])
    assert w.unused() == []


def encode(planes: np.ndarray) -> np.ndarray:
    return np.stack([gguf_quants.quantize(p, Q.Q8_0) for p in planes])


def test_moe_configs_of_gguf_files_read_as_llama_cpp_reads_them(tmp_path):
    from transformers import LlamaConfig, Qwen3MoeConfig

    writer = gguf_lib.GGUFWriter(tmp_path / "m.gguf", "llama")
    writer.add_expert_count(8)
    writer.add_expert_used_count(2)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    mixtral = moe_config(LlamaConfig(hidden_size=64, intermediate_size=96), open_gguf(tmp_path / "m.gguf"))
    assert (mixtral.model_type, mixtral.num_local_experts, mixtral.num_experts_per_tok) == ("mixtral", 8, 2)
    assert mixtral.intermediate_size == 96
    writer = gguf_lib.GGUFWriter(tmp_path / "q.gguf", "qwen3moe")
    writer.add_expert_count(8)
    writer.add_expert_feed_forward_length(48)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    qwen = moe_config(Qwen3MoeConfig(), open_gguf(tmp_path / "q.gguf"))
    assert qwen.moe_intermediate_size == 48 and qwen.norm_topk_prob
