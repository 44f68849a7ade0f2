"""Quantized models on every architecture: our engine's greedy tokens equal transformers' on a float
model whose weights are the dequantized quantized ones (so only the kernels' arithmetic may differ),
alone and on two tensor-parallel ranks; and the launcher's choices and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import ARCHITECTURES, hf_greedy, run_engine
from tgi_zmq.cli import pick_quantize
from tgi_zmq.layers import UnquantizedLinear
from tgi_zmq.messages import SamplingParams
from tgi_zmq.models import load_model
from tgi_zmq.quant import QUANTIZE, check_kv_cache_dtype, check_quantize, runnable
from tgi_zmq.quant.formats import Int4Weight, Int8Weight, quantize_int4, quantize_int8
from tgi_zmq.quant.linear import (
    BitsAndBytesLinear,
    DequantizedLinear,
    Fp8Linear,
    QuantizedLinear,
    QuantScheme,
    quantizer,
)

EMBEDDINGS = ("embed_tokens", "word_embeddings", "shared", "relative_attention_bias")
PROMPTS = [[5, 9, 14, 3, 77], [200, 31, 8], [42] * 6]
MAX_NEW = 8


def dequantized_reference(folder: Path, out: Path, storage: str) -> Path:
    """``folder`` with each linear's weight replaced by its quantized-then-dequantized value, as the
    server quantizes them: the body by ``storage``, the LM head in 8 bits (an untied copy), a mixture of
    experts' router (``*.gate.weight``) kept float."""
    out.mkdir()
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    if "lm_head.weight" not in state:  # tied: the head is the embedding, quantized apart from it
        embedding = next(name for name in state if any(e in name for e in EMBEDDINGS[:3]))
        state["lm_head.weight"] = state[embedding].clone()
        config["tie_word_embeddings"] = False
    body, head = quantizer(storage), quantizer("int8")
    for name, w in state.items():
        if w.ndim == 2 and not any(e in name for e in EMBEDDINGS) and not name.endswith(".gate.weight"):
            state[name] = (head if name == "lm_head.weight" else body)(w).dequantize().contiguous()
    save_file(state, out / "model.safetensors", {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("quantize", ["bitsandbytes", "bitsandbytes-nf4"])
def test_quantized_tokens_equal_transformers_on_the_dequantized_weights(
    arch, quantize, tiny_models, tmp_path
):
    folder = tiny_models(arch)
    storage = QUANTIZE[quantize].storage
    reference = dequantized_reference(folder, tmp_path / "reference", storage)
    expected = [hf_greedy(reference, p, MAX_NEW) for p in PROMPTS]
    params = [SamplingParams()] * len(PROMPTS)
    assert run_engine(folder, PROMPTS, params, MAX_NEW, quantize=quantize)[0] == expected


@pytest.mark.parametrize("quantize", ["eetq", "bitsandbytes-fp4"])
def test_the_other_names_serve_their_storage(quantize, tiny_models, tmp_path):
    """eetq is bitsandbytes' int8 on the CPU, fp4 nf4's method with another code table."""
    folder = tiny_models("llama")
    reference = dequantized_reference(folder, tmp_path / "reference", QUANTIZE[quantize].storage)
    expected = [hf_greedy(reference, p, MAX_NEW) for p in PROMPTS]
    params = [SamplingParams()] * len(PROMPTS)
    assert run_engine(folder, PROMPTS, params, MAX_NEW, quantize=quantize)[0] == expected


def test_layers_hold_quantized_weights(tiny_models):
    folder = tiny_models("llama")
    dense = load_model(folder, "float32", "cpu")
    int8 = load_model(folder, "float32", "cpu", quantize="bitsandbytes")
    nf4 = load_model(folder, "float32", "cpu", quantize="bitsandbytes-nf4")
    from tgi_zmq.models import weight_bytes

    assert weight_bytes(int8) < 0.6 * weight_bytes(dense)
    assert weight_bytes(nf4) < weight_bytes(int8)
    assert isinstance(_unprepared(int8.layers[0].qkv.qweight), Int8Weight)
    assert isinstance(_unprepared(nf4.layers[0].gate_up.qweight), Int4Weight)


def _unprepared(prepared):
    """The format behind what the kernels prepared (the kernels may wrap it)."""
    return getattr(prepared, "weight", prepared)


def test_devices_refuse_what_they_cannot_run():
    assert "fp8" not in runnable("cpu")
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU .* this cpu can run: bitsandbytes, eetq"):
        check_quantize("fp8", "cpu")
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU of compute capability 8.9"):
        check_quantize("fp8", "cuda", (8, 0))
    check_quantize("fp8", "cuda", (9, 0))
    with pytest.raises(ValueError, match="unknown; this cpu can run: .*gptq, awq"):
        check_quantize("int3", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_kv_cache_dtype("fp8_e5m2", "cpu")
    with pytest.raises(ValueError, match="choose fp8_e5m2, fp8_e4m3fn"):
        check_kv_cache_dtype("int8", "cuda")
    check_kv_cache_dtype("fp8_e4m3fn", "cuda")


def test_gptq_needs_a_gptq_checkpoint(tiny_models):
    folder = tiny_models("llama")
    with pytest.raises(ValueError, match="needs a gptq checkpoint"):
        pick_quantize("gptq", folder, "cpu")
    assert pick_quantize(None, folder, "cpu") is None
    assert pick_quantize("eetq", folder, "cpu") == "eetq"


def test_kv_cache_in_8_bit_floats_round_trips(tmp_path):
    """The paths --kv-cache-dtype takes on CUDA, on the CPU: bytes in, widened on the way out."""
    from tgi_zmq.attention import read_pages, store_kv

    cache = torch.zeros(4, 2, 1, 8, dtype=torch.float8_e4m3fn)
    k = torch.randn(3, 1, 8)
    store_kv(k, k, cache, cache, torch.tensor([1, 4, 6]))
    pages = read_pages(cache, torch.tensor([0, 2, 3]), torch.float32).view(-1, 1, 8)
    assert torch.equal(pages[[1, 2, 4]], k.to(torch.float8_e4m3fn).float())
    assert not pages[0].any()


@pytest.mark.parametrize("method,desc_act", [("gptq", False), ("gptq", True), ("awq", False)])
def test_prequantized_checkpoints_give_the_tokens_of_their_dequantized_weights(
    method, desc_act, tiny_models, tmp_path
):
    from tests.quant_checkpoints import (
        write_awq_checkpoint,
        write_dequantized_reference,
        write_gptq_checkpoint,
    )

    folder = tiny_models("llama")
    checkpoint = tmp_path / method
    if method == "gptq":
        write_gptq_checkpoint(folder, checkpoint, group=32, desc_act=desc_act)
    else:
        write_awq_checkpoint(folder, checkpoint, group=32)
    reference = write_dequantized_reference(checkpoint, tmp_path / "reference") or tmp_path / "reference"
    expected = [hf_greedy(reference, p, MAX_NEW) for p in PROMPTS]
    params = [SamplingParams()] * len(PROMPTS)
    assert pick_quantize(None, checkpoint, "cpu") == method
    assert run_engine(checkpoint, PROMPTS, params, MAX_NEW, quantize=method)[0] == expected


def never() -> int:
    raise AssertionError("the inputs are asked only to quantize at load")


def test_the_scheme_picks_each_layers_method():
    """One place decides (vLLM's ``get_quant_method``): float weights dense; a checkpoint's own blocks
    stacked when its parts are stored alike, else one dense weight; a float checkpoint quantized at load
    when its inputs are runs of 32, its head in 8 bits on the CPU; bitsandbytes and fp8 on CUDA."""
    assert type(QuantScheme(None, "cpu").method("x", [None], never, False)) is UnquantizedLinear
    own = QuantScheme("checkpoint", "cpu")
    assert type(own.method("x", ["int4", "int4", "int4"], never, False)) is QuantizedLinear
    assert own.method("x", ["int4"], never, True).quantize is None
    for mixed in (["int4", "int4", "int8"], ["int4", None], [None]):
        assert type(own.method("x", mixed, never, False)) is DequantizedLinear
    int8, nf4 = QuantScheme("int8", "cpu"), QuantScheme("nf4", "cpu")
    assert int8.method("x", [None, None], lambda: 64, False).quantize is quantize_int8
    assert type(int8.method("x", [None], lambda: 48, False)) is DequantizedLinear
    assert nf4.method("x", [None], lambda: 64, False).quantize not in (None, quantize_int8)
    assert nf4.method("x", [None], lambda: 64, True).quantize is quantize_int8
    assert type(QuantScheme("nf4", "cuda").method("x", [None], never, True)) is BitsAndBytesLinear
    assert type(QuantScheme("fp8", "cuda").method("x", [None], never, False)) is Fp8Linear
    with pytest.raises(ValueError, match="no linear method stores weights as 'int3'"):
        QuantScheme("int3", "cpu")


def test_parts_in_different_formats_are_served_dense():
    """A GGUF's q/k in Q4_K beside its v in Q6_K (served as float) stack into one dense weight; the
    quantized method refuses them rather than compute a wrong answer."""
    torch.manual_seed(0)
    q, v = torch.randn(64, 64), torch.randn(32, 64)
    stored = {"q.weight": quantize_int4(q), "v.weight": v}
    weights = SimpleNamespace(get_quantized=lambda name, rows, cols: stored[name], dtype=torch.float32)
    parts, x = [("q", None), ("v", None)], torch.randn(3, 64)
    layer = SimpleNamespace(bias=None)
    DequantizedLinear().load(layer, weights, parts, None)
    expected = x @ torch.cat([stored["q.weight"].dequantize(), v]).T
    torch.testing.assert_close(DequantizedLinear().apply(layer, x), expected)
    with pytest.raises(ValueError, match="q: parts in different formats or input orders do not stack"):
        QuantizedLinear(None).load(SimpleNamespace(bias=None), weights, parts, None)
    stored["v.weight"] = quantize_int4(v)  # one format: one quantized weight
    method, layer = QuantizedLinear(None), SimpleNamespace(bias=None)
    method.load(layer, weights, parts, None)
    assert not hasattr(layer, "weight") and layer.qweight.shape == (96, 64)
    expected = x @ torch.cat([w.dequantize() for w in stored.values()]).T
    torch.testing.assert_close(method.apply(layer, x), expected)
