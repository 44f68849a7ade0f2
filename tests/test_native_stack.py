"""``csrc/llama_stack.cpp``: a Llama stack's layers in one call give the Python layers' logits bit for bit
(the same kernels in the same order), in float32 and bfloat16, batch-invariant or not, with q|k|v biases
(Qwen2), Phi-3's, with int8 (GGUF's too: offsets, scales per 16 inputs) and 4-bit weights, over decode
steps and (batch-invariant) prefill chunks of a tiny model in this process; the layers it does not compute
(StarCoder2's) run in Python."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import built_extension, run_engine
from tgi_zmq import native
from tgi_zmq.messages import SamplingParams
from tgi_zmq.models import load_model
from tgi_zmq.models.llama import LlamaModel
from tgi_zmq.quant import linear
from tgi_zmq.quant.formats import Int8Weight, quantize_int8

PROMPTS = [[(7 * i + j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(6)]


WEIGHTS = [  # (arch, dtype, quantize): qwen2 has q|k|v biases; eetq: int8; bitsandbytes-nf4: 4-bit LUT
    ("llama", "float32", None),
    ("llama", "bfloat16", None),
    ("qwen2", "float32", None),
    ("qwen2", "bfloat16", None),
    ("phi3", "float32", None),  # its fused checkpoint tensors load as Llama's layers
    ("llama", "bfloat16", "eetq"),
    ("llama", "float32", "bitsandbytes-nf4"),
]


@pytest.mark.parametrize(("arch", "dtype", "quantize"), WEIGHTS)
@pytest.mark.parametrize("invariant", [True, False])
def test_the_native_stack_gives_the_python_layers_logits(
    tiny_models, monkeypatch, arch, dtype, quantize, invariant
):
    compare_stack_and_layers(tiny_models(arch), monkeypatch, dtype, quantize, invariant)


def int8_offsets(w: torch.Tensor) -> Int8Weight:
    """GGUF's Q5_1 / Q5_K repacked: unsigned 5-bit codes, a scale and a minimum per 32 inputs."""
    n, k = w.shape
    wg = w.float().view(n, k // 32, 32)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = (hi - lo) / 31
    codes = torch.round((wg - lo.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 31).to(torch.int8)
    return Int8Weight(codes.view(n, k), scales, 32, lo)


@pytest.mark.parametrize(
    "int8",
    [int8_offsets, lambda w: quantize_int8(w, 16)],  # GGUF's Q5_1/Q5_K, Q6_K
    ids=["offsets", "group16"],
)
@pytest.mark.parametrize("invariant", [True, False])
def test_the_native_stack_takes_ggufs_int8_formats(tiny_models, monkeypatch, int8, invariant):
    monkeypatch.setattr(linear, "quantize_int8", int8)  # --quantize eetq's layers and head
    compare_stack_and_layers(tiny_models("llama"), monkeypatch, "bfloat16", "eetq", invariant)


def compare_stack_and_layers(folder, monkeypatch, dtype: str, quantize: str | None, invariant: bool) -> None:
    ext = built_extension()
    calls = []
    monkeypatch.setattr(
        ext, "llama_layers", lambda *a, f=ext.llama_layers: calls.append(a[0].shape[0]) or f(*a)
    )
    logits: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    forward = LlamaModel.forward

    def recording(self, batch, cache):
        out = forward(self, batch, cache)
        logits[self.use_native_stack].append(out.clone())
        return out

    monkeypatch.setattr(LlamaModel, "forward", recording)
    monkeypatch.setattr(native, "INVARIANT", invariant)
    params = [SamplingParams(do_sample=i % 2 == 1, seed=i) for i in range(len(PROMPTS))]
    tokens = {}
    for stack in (True, False):
        monkeypatch.setattr(LlamaModel, "use_native_stack", stack)
        tokens[stack], _ = run_engine(
            folder, PROMPTS, params, 8, max_step_tokens=16, dtype=dtype, quantize=quantize
        )
    assert tokens[True] == tokens[False]
    assert len(logits[True]) == len(logits[False])
    for native_logits, python_logits in zip(logits[True], logits[False], strict=True):
        assert torch.equal(native_logits, python_logits)
    assert any(rows > 1 for rows in calls)  # steps of several rows (decodes together)
    if invariant:
        assert max(calls) > len(PROMPTS)  # prompt chunks through the stack too


@pytest.mark.parametrize("use_bias", [True, False])
def test_layers_the_stack_does_not_compute_run_in_python(tiny_models, use_bias):
    """StarCoder2's LayerNorms and ungated MLP (without biases too, which alone would not tell)."""
    built_extension()
    model = load_model(tiny_models("starcoder2", use_bias=use_bias), "float32", "cpu")
    assert not model.native_stack(1)
    assert load_model(tiny_models("phi3"), "float32", "cpu").native_stack(1)
