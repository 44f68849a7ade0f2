"""tgi_zmq.quant.kernels: every kernel and code path equals ``x @ w.dequantize().T (+ bias)``.

Shapes are small (seconds in all); the extension is built once (cached under build/ by source hash:
scripts/setup has usually built it already)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import built_extension
from tgi_zmq import native
from tgi_zmq.quant import kernels
from tgi_zmq.quant.formats import NF4, Int8Weight, quantize_int4, quantize_int8, quantize_lut4

N, K = 42, 192  # N not a multiple of the kernels' 4-row tiles; K of 3 groups of 64, 6 of 32


@pytest.fixture(scope="module")
def ext():
    return built_extension()


def int8_offsets(w: torch.Tensor, group: int = 32) -> Int8Weight:
    """Unsigned 5-bit codes with a scale and a minimum per group (GGUF's Q5_1 and Q5_K, repacked)."""
    n, k = w.shape
    wg = w.view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = (hi - lo) / 31
    codes = torch.round((wg - lo.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 31).to(torch.int8)
    return Int8Weight(codes.view(n, k), scales, group, lo)


WEIGHTS = {
    "int8-channel": lambda w: quantize_int8(w),
    "int8-g32": lambda w: quantize_int8(w, 32),
    "int8-g16": lambda w: quantize_int8(w, 16),  # GGUF's Q6_K, repacked
    "int8-offsets-g32": int8_offsets,
    "int8-offsets-g64": lambda w: int8_offsets(w, 64),
    "int4-g32": lambda w: quantize_int4(w),
    "int4-g64": lambda w: quantize_int4(w, 64),
    "nf4-g64": lambda w: quantize_lut4(w, NF4),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weight(name: str):
    return WEIGHTS[name](torch.randn(N, K, generator=_gen(1)))


def isas(ext) -> list[str]:
    """The code paths this CPU runs (a request above the CPU's best is clamped to it)."""
    return sorted({ext.isa_name(code) for code in native.ISAS.values()})


def prepared(monkeypatch, w, kernel: str, isa: str = "auto") -> kernels.Prepared:
    monkeypatch.setenv("TGI_ZMQ_QKERNEL", kernel)
    monkeypatch.setenv("TGI_ZMQ_ISA", isa)
    return kernels.prepare(w)


def check(y: torch.Tensor, x: torch.Tensor, w, bias: torch.Tensor | None) -> None:
    """Against float32 math on the reference weights; bound on |x| @ |w|^T (no cancellation luck)."""
    wf = w.dequantize()
    ref = x.float() @ wf.T + (0 if bias is None else bias.float())
    bound = x.float().abs() @ wf.abs().T
    assert y.dtype == x.dtype and y.shape == ref.shape
    tol = 1e-5 if x.dtype == torch.float32 else 1.5e-2  # float32 summation order; bfloat16 output/weights
    err = (y.float() - ref).abs()
    assert (err <= tol * bound + 1e-4 * ref.abs()).all(), (
        f"max error {err.max():.3g}, bound {bound.max():.3g}"
    )


@pytest.mark.parametrize("fmt", list(WEIGHTS))
@pytest.mark.parametrize("m", [1, 3, 7])
def test_fused_every_isa(ext, monkeypatch, fmt, m):
    w = weight(fmt)
    x = torch.randn(m, K, generator=_gen(2))
    bias = torch.randn(N, generator=_gen(3))
    for isa in isas(ext):
        p = prepared(monkeypatch, w, "fused", isa)
        assert ext.isa_name(p.isa) == isa
        check(kernels.linear(x, p, bias), x, w, bias)
        check(kernels.linear(x, p), x, w, None)


@pytest.mark.parametrize(
    "fmt", ["int8-channel", "int8-g32", "int8-g16", "int8-offsets-g32", "int4-g32", "nf4-g64"]
)
@pytest.mark.parametrize("kernel", ["fused", "dequant", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_and_dtypes(ext, monkeypatch, fmt, kernel, dtype):
    w = weight(fmt)
    x = torch.randn(2, 5, K, generator=_gen(4)).to(dtype)  # leading dims: rows of x = 10
    bias = torch.randn(N, generator=_gen(5)).to(dtype)
    for isa in isas(ext) if kernel != "reference" else ["auto"]:
        y = kernels.linear(x, prepared(monkeypatch, w, kernel, isa), bias)
        assert y.shape == (2, 5, N)
        check(y.view(10, N), x.view(10, K), w, bias)


def test_dequant_in_several_passes(ext, monkeypatch):
    """A weight larger than the scratch buffer is dequantized and multiplied some rows at a time."""
    monkeypatch.setattr(kernels, "SCRATCH_ELEMENTS", 10 * K)
    w = weight("int4-g32")
    x = torch.randn(9, K, generator=_gen(6))
    bias = torch.randn(N, generator=_gen(7))
    check(kernels.linear(x, prepared(monkeypatch, w, "dequant"), bias), x, w, bias)


@pytest.mark.parametrize("fmt", ["int8-g32", "int8-g16", "int8-offsets-g32"])
def test_dequantize_matches_reference_exactly_for_int8(ext, fmt):
    """Exact where the codes times the scales are (GGUF's: float16 scales, codes of at most 8 bits), so
    the kernels' one rounding (an FMA with the offset) is the reference's one."""
    w = weight(fmt)
    w.scales = w.scales.half().float()
    for isa in isas(ext):
        out = torch.empty(N, K)
        ext.dequantize(w.qweight, w.scales, w.offsets, None, w.group, out, native.ISAS[isa])
        assert torch.equal(out, w.dequantize())


@pytest.mark.parametrize("fmt", ["int8-g16", "int8-offsets-g32"])
@pytest.mark.parametrize("m", [1, 4, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_int8_formats_by_rule(ext, monkeypatch, fmt, m, dtype):
    """Q6_K's scales per 16 inputs and Q5's offsets through the kernel the rules pick, and each forced."""
    monkeypatch.delenv("TGI_ZMQ_QKERNEL", raising=False)
    monkeypatch.delenv("TGI_ZMQ_ISA", raising=False)
    w = weight(fmt)
    x = torch.randn(m, K, generator=_gen(11)).to(dtype)
    p = kernels.prepare(w)
    assert p.forced is None and p.format == "int8"
    check(kernels.linear(x, p), x, w, None)
    for kernel in ("fused", "dequant"):
        check(kernels.linear(x, prepared(monkeypatch, w, kernel)), x, w, None)


def test_offsets_with_scales_per_16_are_refused(ext, monkeypatch):
    """The kernels take a group of 16 only without offsets (no GGUF type has both): the reference."""
    monkeypatch.delenv("TGI_ZMQ_QKERNEL", raising=False)
    w = int8_offsets(torch.randn(N, K, generator=_gen(12)), 16)
    assert kernels.prepare(w).forced == "reference"
    with pytest.raises(RuntimeError, match="group"):
        ext.dequantize(w.qweight, w.scales, w.offsets, None, 16, torch.empty(N, K), 0)


def test_rules_pick_by_rows(ext, monkeypatch):
    monkeypatch.delenv("TGI_ZMQ_QKERNEL", raising=False)
    monkeypatch.delenv("TGI_ZMQ_ISA", raising=False)
    for fmt in ("int8-channel", "int4-g32"):
        p = kernels.prepare(weight(fmt))
        assert p.forced is None
        for dtype in (torch.float32, torch.bfloat16):
            assert p.kernel(1, dtype) == "fused"
            ranges = kernels.RULES.get((kernels.RULE_CAPABILITY, p.format, dtype), kernels.FUSED)
            assert p.kernel(4096, dtype) == ranges[-1][1]
    assert p.kernel(4096, torch.float16) == "fused"
    assert "fused" in kernels.backend()


def test_refused_shapes_and_devices_use_the_reference(ext, monkeypatch):
    monkeypatch.delenv("TGI_ZMQ_QKERNEL", raising=False)
    w = quantize_int8(torch.randn(8, 100, generator=_gen(8)))  # K not a multiple of 32
    assert kernels.prepare(w).forced == "reference"
    x = torch.randn(3, 100, generator=_gen(9))
    check(kernels.linear(x, kernels.prepare(w)), x, w, None)


def test_without_the_extension(monkeypatch):
    """No compiler at setup (or a stale build): every weight runs the reference kernel."""
    monkeypatch.setattr(native, "_ext", None)
    monkeypatch.setattr(native, "_ext_tried", True)
    monkeypatch.delenv("TGI_ZMQ_QKERNEL", raising=False)
    w = weight("nf4-g64")
    p = kernels.prepare(w)
    assert p.forced == "reference"
    x = torch.randn(5, K, generator=_gen(10))
    check(kernels.linear(x, p), x, w, None)
    assert "not built" in kernels.backend()
    monkeypatch.setenv("TGI_ZMQ_QKERNEL", "fused")  # forcing a kernel never breaks a server without it
    assert kernels.prepare(w).forced == "reference"


def test_bad_environment(monkeypatch):
    monkeypatch.setenv("TGI_ZMQ_QKERNEL", "fast")
    with pytest.raises(ValueError, match="TGI_ZMQ_QKERNEL"):
        kernels.prepare(weight("int8-g32"))
    monkeypatch.setenv("TGI_ZMQ_QKERNEL", "reference")
    monkeypatch.setenv("TGI_ZMQ_ISA", "sse")
    with pytest.raises(ValueError, match="TGI_ZMQ_ISA"):
        kernels.prepare(weight("int8-g32"))


def test_prepare_keeps_the_quantized_size(ext, monkeypatch):
    w = weight("int8-channel")
    p = prepared(monkeypatch, w, "fused")
    assert isinstance(p.weight, Int8Weight) and p.weight.nbytes() == w.nbytes()


def test_a_failed_build_leaves_the_reference(monkeypatch, tmp_path, caplog):
    """setup must not fail without a working compiler: build() warns and returns None."""
    broken = tmp_path / "module.cpp"
    broken.write_text("#error no compiler here\n")
    monkeypatch.setattr(native, "SOURCES", [broken])
    monkeypatch.setattr(native, "BUILD_DIR", tmp_path / "build")
    monkeypatch.setattr(native, "_ext", native._ext)  # restored after the test
    monkeypatch.setattr(native, "_ext_tried", native._ext_tried)
    assert native.build() is None
    assert "failed" in caplog.text and native.extension() is None
