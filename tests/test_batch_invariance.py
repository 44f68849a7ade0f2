"""Batch invariance (``--deterministic``, ``native.INVARIANT``): a row's result never depends on the rows
beside it. The kernels bit for bit (every ISA path this CPU has), then a tiny Llama in this process: 32
greedy and seeded requests give the same tokens alone, all together and beside a long prompt prefilled
in chunks, in bfloat16 and with 8-bit and 4-bit weights. The service's side: tests/test_e2e_invariance.py."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import built_extension, isa_codes, run_engine
from tgi_zmq import native
from tgi_zmq.messages import SamplingParams
from tgi_zmq.quant import kernels
from tgi_zmq.quant.formats import NF4, quantize_int8, quantize_lut4


@pytest.fixture(scope="module")
def ext():
    return built_extension()


def assert_rows_alike(full: torch.Tensor, op, x: torch.Tensor) -> None:
    """``op`` over rows lo..hi of ``x`` alone equals rows lo..hi of ``full``, bit for bit."""
    rows = x.shape[0]
    for lo, hi in ((0, 1), (5, 6), (3, 7), (1, 18), (130, rows), (0, rows - 1)):
        assert torch.equal(op(x[lo:hi].contiguous()), full[lo:hi]), (lo, hi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [96, 72, 100])  # vdpbf16ps / AVX-512 (k % 32, % 16), AVX2 (k % 8), one lane
def test_gemv_rows_do_not_depend_on_the_rows_beside_them(ext, dtype, k):
    g = torch.Generator().manual_seed(k)
    w, x = torch.randn(37, k, generator=g).to(dtype), torch.randn(300, k, generator=g).to(dtype)
    for isa in isa_codes(ext):
        full = ext.gemv(x, w, None, isa)  # 300 rows: blocks of 128, tiles of 4 and single rows
        assert_rows_alike(full, lambda rows, isa=isa: ext.gemv(rows, w, None, isa), x)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantized_rows_alike_take_one_formula(ext, fmt):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(36, 128, generator=g)
    prepared = kernels.prepare(quantize_int8(w) if fmt == "int8" else quantize_lut4(w, NF4, 64))
    args = kernels._args(prepared.weight)
    x = torch.randn(200, 128, generator=g)
    for isa in isa_codes(ext):
        full = ext.linear(x, *args, None, isa, True)
        assert_rows_alike(full, lambda rows, isa=isa: ext.linear(rows, *args, None, isa, True), x)
        torch.testing.assert_close(full, x @ prepared.weight.dequantize().T, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 40, 36])
def test_rms_norm_and_silu_mul_equal_torch_row_by_row(ext, dtype, width):
    g = torch.Generator().manual_seed(width)
    x, weight = torch.randn(200, width, generator=g).to(dtype), torch.randn(width, generator=g).to(dtype)
    gate_up = (3 * torch.randn(200, 2 * width, generator=g)).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])  # exp's far ends and zero
    xf = x.float()
    norm = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    gate, up = gate_up.chunk(2, -1)
    act = torch.nn.functional.silu(gate) * up
    tol = {} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    for isa in isa_codes(ext):
        full_norm, full_act = ext.rms_norm(x, weight, 1e-6, isa), ext.silu_mul(gate_up, isa)
        torch.testing.assert_close(full_norm, norm, **tol)
        torch.testing.assert_close(full_act, act, **tol)
        assert_rows_alike(full_norm, lambda rows, isa=isa: ext.rms_norm(rows, weight, 1e-6, isa), x)
        assert_rows_alike(full_act, lambda rows, isa=isa: ext.silu_mul(rows, isa), gate_up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_and_the_fused_residual_norm_equal_torch(ext, dtype):
    """RoPE on q and k as views of one q|k|v row (strided rows), and x += delta then RMSNorm."""
    g = torch.Generator().manual_seed(2)
    cos, sin = (torch.randn(300, 8, generator=g).repeat(1, 2).to(dtype) for _ in range(2))
    qkv = torch.randn(37, 8 * 16, generator=g).to(dtype)
    positions = torch.randint(0, 300, (37,), generator=g)
    q, k = qkv[:, :64].view(37, 4, 16), qkv[:, 64:96].view(37, 2, 16)
    rotated = []
    for x in (q, k):
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        rotated.append(x * c + torch.cat([-x[..., 8:], x[..., :8]], dim=-1) * s)
    v = qkv[:, 96:].clone()
    ext.rope_(q, k, cos, sin, positions)
    tol = {} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 5e-2}
    torch.testing.assert_close(q, rotated[0], **tol)
    torch.testing.assert_close(k, rotated[1], **tol)
    assert torch.equal(qkv[:, 96:], v)  # v untouched
    x, delta = torch.randn(37, 64, generator=g).to(dtype), torch.randn(37, 64, generator=g).to(dtype)
    weight = torch.randn(64, generator=g).to(dtype)
    expected_x = x + delta
    normed = ext.add_rms_norm_(x, delta, weight, 1e-5, 0)
    assert torch.equal(x, expected_x) and torch.equal(normed, ext.rms_norm(expected_x, weight, 1e-5, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompts_attention_rows_equal_decoding_each_position(ext, dtype):
    """A 600-token context (three parts of 256 keys): its 600 query rows in one call (a task per row)
    give what each position gives decoded alone (tasks per part), and beside another request."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, block, n = 4, 2, 16, 4, 600
    k_cache = torch.randn(200, block, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(200, block, kv_heads, dim, generator=g).to(dtype)
    table = torch.randperm(200, generator=g)[: n // block]
    q = torch.randn(n, heads, dim, generator=g).to(dtype)
    lens = torch.arange(1, n + 1)
    for isa in isa_codes(ext):
        rows = ext.paged_decode(q, k_cache, v_cache, table.expand(n, -1).contiguous(), lens, 0.25, isa)
        for i in (0, 255, 256, 511, 599):
            one = (q[i : i + 1], k_cache, v_cache, table.view(1, -1), lens[i : i + 1])
            assert torch.equal(ext.paged_decode(*one, 0.25, isa), rows[i : i + 1]), i
        other = torch.randperm(200, generator=g)[: n // block].view(1, -1)
        pair = ext.paged_decode(
            torch.cat([q[599:], q[:1]]), k_cache, v_cache, torch.cat([table.view(1, -1), other]),
            torch.tensor([600, 37]), 0.25, isa,
        )  # fmt: skip
        assert torch.equal(pair[:1], rows[599:])


PROMPTS = [[(7 * i + 3 * j) % 500 + 3 for j in range(5 + i % 13)] for i in range(32)]
LONG = [(11 * j) % 500 + 3 for j in range(300)]


def params(i: int) -> SamplingParams:
    if i % 2:
        return SamplingParams()
    return SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, seed=i)


MODES = [("bfloat16", None), ("bfloat16", "eetq"), ("bfloat16", "bitsandbytes-nf4"), ("float32", None)]


@pytest.mark.parametrize("dtype,quantize", MODES)
def test_32_requests_give_their_tokens_alone_together_and_beside_a_long_prefill(
    tiny_models, monkeypatch, dtype, quantize
):
    monkeypatch.setattr(native, "INVARIANT", True)
    folder = tiny_models("llama", hidden_size=128, intermediate_size=256)
    run = dict(num_blocks=512, block_size=4, max_step_tokens=48, dtype=dtype, quantize=quantize)
    alone = [run_engine(folder, [p], [params(i)], 12, **run)[0][0] for i, p in enumerate(PROMPTS)]
    together, _ = run_engine(folder, PROMPTS, [params(i) for i in range(32)], 12, **run)
    beside, _ = run_engine(
        folder, [LONG, *PROMPTS], [SamplingParams(), *map(params, range(32))], 12, arrive_every=1, **run
    )
    assert together == alone
    assert beside[1:] == alone
