"""GPTQ/AWQ checkpoints repacked into Int4Weight: hand-made words, round trips, slices, errors, configs.

Neither auto_gptq nor autoawq is installed, so the layouts are pinned by hand-computed words and by
reference decoders written independently of ``tgi_zmq.checkpoint.gptq`` (per element, from the published
layouts): a mistake shared by our packer and unpacker cannot cancel out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.quant_checkpoints import (
    LINEARS,
    pack_awq,
    pack_gptq,
    write_awq_checkpoint,
    write_dequantized_reference,
    write_gptq_checkpoint,
)
from tgi_zmq.checkpoint.gptq import QuantConfig, awq_to_int4, gptq_to_int4, int4_layout, read_quant_config
from tgi_zmq.checkpoint.safetensors import SafetensorsWeights
from tgi_zmq.quant.linear import DequantizedLinear, QuantizedLinear

AWQ_NIBBLE_OF_OUTPUT = [0, 4, 1, 5, 2, 6, 3, 7]  # AutoAWQ packs outputs [0, 2, 4, 6, 1, 3, 5, 7]
N, K = 40, 256


def int32(word: int) -> int:
    return word - 2**32 if word >= 2**31 else word


def ref_gptq(t: dict[str, torch.Tensor], v2: bool = False) -> torch.Tensor:
    """w[n, k] = (q - z) * s, each element looked up in the packed words (float32 [N, K])."""
    qweight, qzeros, scales = t["qweight"].long() & 0xFFFFFFFF, t["qzeros"].long() & 0xFFFFFFFF, t["scales"]
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    kk, nn = torch.arange(k)[:, None], torch.arange(n)[None, :]
    g = t["g_idx"].long()[:, None]
    q = (qweight[kk // 8, nn] >> (4 * (kk % 8))) & 15
    if not v2:  # v1 holds z - 1 per nibble, borrowing across nibbles where z is 0 (GPTQModel)
        qzeros = (qzeros + 0x11111111) % 2**32
    z = (qzeros[g, nn // 8] >> (4 * (nn % 8))) & 15
    return ((q - z) * scales.float()[g, nn]).T


def ref_awq(t: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    qweight, qzeros, scales = t["qweight"].long() & 0xFFFFFFFF, t["qzeros"].long() & 0xFFFFFFFF, t["scales"]
    k, n = qweight.shape[0], scales.shape[1]
    kk, nn = torch.arange(k)[:, None], torch.arange(n)[None, :]
    shift = 4 * torch.tensor(AWQ_NIBBLE_OF_OUTPUT)[nn % 8]
    q = (qweight[kk, nn // 8] >> shift) & 15
    z = (qzeros[kk // group, nn // 8] >> shift) & 15
    return ((q - z) * scales.float()[kk // group, nn]).T


def unpermuted(w: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """The weight in the original input order: ``x[:, perm] @ w.T == x @ out.T``."""
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[:, perm] = w
    return out


def gptq(t: dict[str, torch.Tensor], cfg: QuantConfig, **kw) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, perm = gptq_to_int4(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], cfg, **kw)
    return unpermuted(weight.dequantize(), perm), perm


def awq(t: dict[str, torch.Tensor], cfg: QuantConfig, **kw) -> torch.Tensor:
    return awq_to_int4(t["qweight"], t["qzeros"], t["scales"], cfg, **kw).dequantize()


def weight(n: int = N, k: int = K, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


# -- hand-computed words ---------------------------------------------------------------------------


def test_gptq_words_by_hand():
    # rows of qweight alternate 0x76543210 and 0xFEDCBA98: input 8r + i holds i (+8 on odd rows)
    words = torch.tensor([int32(0x76543210), int32(0xFEDCBA98)] * 2, dtype=torch.int32)
    t = {
        "qweight": words[:, None].expand(4, 8).contiguous(),
        "qzeros": torch.tensor([[int32(0x76543210)]], dtype=torch.int32),  # v1: z - 1 = n, so z = n + 1
        "scales": (torch.arange(1, 9, dtype=torch.float16) / 4)[None],
        "g_idx": torch.zeros(32, dtype=torch.int32),
    }
    k, n = torch.arange(32)[None], torch.arange(8)[:, None]
    expected = ((k % 8 + 8 * (k // 8 % 2)) - (n + 1)) * (n + 1) / 4
    w, perm = gptq(t, QuantConfig("gptq", group_size=32))
    assert perm is None
    assert torch.equal(w, expected.float())
    assert torch.equal(ref_gptq(t), expected.float())


def test_gptq_v1_zero_point_of_zero_borrows_from_the_next_nibble():
    # z = [0, 1, 1, 1, 1, 1, 1, 1]: packed 0x11111110, stored minus 0x11111111 = 0xFFFFFFFF (GPTQModel);
    # gptq_v2 stores 0x11111110 itself
    z = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float32)
    t = {
        "qweight": torch.zeros(4, 8, dtype=torch.int32),
        "scales": torch.full((1, 8), 0.5, dtype=torch.float16),
    }
    t["g_idx"] = torch.zeros(32, dtype=torch.int32)
    for fmt, word in (("gptq", 0xFFFFFFFF), ("gptq_v2", 0x11111110)):
        t["qzeros"] = torch.tensor([[int32(word)]], dtype=torch.int32)
        w, _ = gptq(t, QuantConfig("gptq", group_size=32, checkpoint_format=fmt))
        assert torch.equal(w, (-z * 0.5)[:, None].expand(8, 32))


def test_awq_words_by_hand():
    # every qweight word 0x76543210: nibble i holds i, and nibble i is output [0, 2, 4, 6, 1, 3, 5, 7][i];
    # qzeros 0x00000021: nibble 0 (output 0) holds 1, nibble 1 (output 2) holds 2
    t = {
        "qweight": torch.full((32, 1), int32(0x76543210), dtype=torch.int32),
        "qzeros": torch.tensor([[0x21]], dtype=torch.int32),
        "scales": torch.full((1, 8), 0.25, dtype=torch.float16),
    }
    q = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7], dtype=torch.float32)
    z = torch.tensor([1, 0, 2, 0, 0, 0, 0, 0], dtype=torch.float32)
    expected = ((q - z) * 0.25)[:, None].expand(8, 32)
    assert torch.equal(awq(t, QuantConfig("awq", group_size=32)), expected)
    assert torch.equal(ref_awq(t, 32), expected)


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize(("sym", "v2"), [(False, False), (True, False), (False, True)])
def test_gptq_round_trip_is_the_checkpoints_weight(group, desc_act, sym, v2):
    w0 = weight()
    w0[:, :32] = w0[:, :32].abs()  # groups with z = 0, stored by borrowing in v1
    t = pack_gptq(w0, group, desc_act=desc_act, seed=1, sym=sym, v2=v2)
    cfg = QuantConfig(
        "gptq", group_size=group, desc_act=desc_act, sym=sym, checkpoint_format="gptq_v2" if v2 else "gptq"
    )
    w, perm = gptq(t, cfg)
    reference = ref_gptq(t, v2)
    assert torch.equal(w, reference)
    assert (perm is None) == (not desc_act or group == -1)
    step = t["scales"].float()[t["g_idx"].long(), torch.arange(N)[:, None]]
    assert ((w - w0).abs() <= step * 1.001).all()  # the nearest point of the grid (clamped at its ends)
    x = torch.randn(3, K)
    weight_, perm_ = gptq_to_int4(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], cfg)
    x_in = x if perm_ is None else x[:, perm_]
    torch.testing.assert_close(x_in @ weight_.dequantize().T, x @ reference.T)


def test_gptq_partial_last_group():
    t = pack_gptq(weight(16, 96), 64)  # groups of 64 and 32 inputs: the int4 groups are 32
    weight_, _ = gptq_to_int4(
        t["qweight"], t["qzeros"], t["scales"], t["g_idx"], QuantConfig("gptq", group_size=64)
    )
    assert weight_.group == 32
    assert torch.equal(weight_.dequantize(), ref_gptq(t))


@pytest.mark.parametrize("group", [32, 128])
def test_awq_round_trip_is_the_checkpoints_weight(group):
    w0 = weight()
    t = pack_awq(w0, group)
    assert t["qweight"].shape == (K, N // 8) and t["qzeros"].shape == (K // group, N // 8)
    w = awq(t, QuantConfig("awq", group_size=group))
    assert torch.equal(w, ref_awq(t, group))
    step = t["scales"].float()[torch.arange(K) // group, torch.arange(N)[:, None]]
    assert ((w - w0).abs() <= step * 1.001).all()


# -- tensor-parallel slices ------------------------------------------------------------------------

SLICES = [((5, 29), None), (None, (64, 192)), ((8, 40), (128, 256)), (None, (32, 96))]


@pytest.mark.parametrize(("rows", "cols"), SLICES)
def test_gptq_slices_are_slices_of_the_full_weight(rows, cols):
    t = pack_gptq(weight(), 64)
    full = ref_gptq(t)
    w, perm = gptq(t, QuantConfig("gptq", group_size=64), rows=rows, cols=cols)
    (r0, r1), (c0, c1) = rows or (0, N), cols or (0, K)
    assert perm is None
    assert torch.equal(w, full[r0:r1, c0:c1])


@pytest.mark.parametrize(("rows", "cols"), SLICES)
def test_awq_slices_are_slices_of_the_full_weight(rows, cols):
    t = pack_awq(weight(), 64)
    (r0, r1), (c0, c1) = rows or (0, N), cols or (0, K)
    assert torch.equal(
        awq(t, QuantConfig("awq", group_size=64), rows=rows, cols=cols), ref_awq(t, 64)[r0:r1, c0:c1]
    )


def test_gptq_one_group_splits_by_columns():
    t = pack_gptq(weight(), -1)
    for cols in ((0, 128), (128, 256)):
        weight_, _ = gptq_to_int4(
            t["qweight"], t["qzeros"], t["scales"], t["g_idx"], QuantConfig("gptq", group_size=-1), cols=cols
        )
        assert weight_.group == 128
        assert torch.equal(weight_.dequantize(), ref_gptq(t)[:, cols[0] : cols[1]])


def test_act_order_splits_by_rows_not_inside_groups():
    t = pack_gptq(weight(), 32, desc_act=True, seed=3)
    cfg = QuantConfig("gptq", group_size=32, desc_act=True)
    _, full_perm = gptq(t, cfg)
    w, perm = gptq(t, cfg, rows=(3, 19))
    assert torch.equal(perm, full_perm)
    assert torch.equal(w, ref_gptq(t)[3:19])
    with pytest.raises(ValueError, match=r"inputs \[0, 128\) of 256 cut its groups of 32"):
        gptq(t, cfg, cols=(0, 128))


def test_int4_layout_tells_which_linears_stack():
    """Parts of one linear stack into one Int4Weight when their groups and input order agree: read from
    g_idx alone (a missing g_idx is the inputs in order)."""
    cfg = QuantConfig("gptq", group_size=32, desc_act=True)
    in_order = pack_gptq(weight(), 32)["g_idx"]
    shuffled = [pack_gptq(weight(), 32, desc_act=True, seed=seed)["g_idx"] for seed in (1, 1, 2)]
    assert int4_layout(cfg, in_order, K, None) == int4_layout(cfg, None, K, None) == (32, None)
    assert int4_layout(cfg, shuffled[0], K, None) == int4_layout(cfg, shuffled[1], K, None)
    assert int4_layout(cfg, shuffled[0], K, None) != int4_layout(cfg, shuffled[2], K, None)
    assert int4_layout(cfg, in_order, K, (0, 16))[0] == 16  # a cut group: shorter runs
    awq_cfg = QuantConfig("awq", group_size=64)
    assert int4_layout(awq_cfg, None, K, (64, 256)) == (64, None)


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(method="gptq", bits=8), "GPTQ checkpoint with 8-bit weights: only 4-bit"),
        (dict(method="awq", bits=3), "AWQ checkpoint with 3-bit weights"),
        (
            dict(method="gptq", group_size=48),
            "group_size 48: the int4 format needs groups of a multiple of 32",
        ),
        (dict(method="gptq", group_size=0), "group_size 0"),
        (dict(method="awq", version="gemv"), "AWQ version 'gemv'"),
        (dict(method="awq", zero_point=False), "zero_point false"),
        (dict(method="gptq", checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
        (dict(method="eetq"), "'eetq' is not GPTQ or AWQ"),
    ],
)
def test_unsupported_configs_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**fields)


def test_bad_splits_and_shapes_are_refused():
    t = pack_gptq(weight(16, 128), 64)
    cfg = QuantConfig("gptq", group_size=64)
    with pytest.raises(ValueError, match=r"inputs \[16, 80\) of 128 cut its groups of 64 into runs of 16"):
        gptq(t, cfg, cols=(16, 80))
    with pytest.raises(ValueError, match=r"rows \[0, 17\) is not a slice of 16"):
        gptq(t, cfg, rows=(0, 17))
    with pytest.raises(ValueError, match="GPTQ tensors disagree"):
        gptq({**t, "g_idx": t["g_idx"][:64]}, cfg)
    t = pack_gptq(weight(16, 80), -1)  # one group of 80 inputs
    with pytest.raises(
        ValueError, match="80 inputs in groups of 80: the int4 format needs groups of a multiple"
    ):
        gptq(t, QuantConfig("gptq", group_size=-1))
    t = pack_awq(weight(16, 128), 64)
    with pytest.raises(ValueError, match=r"AWQ inputs \[0, 48\) of 128 cut its groups of 64 into runs of 48"):
        awq(t, QuantConfig("awq", group_size=64), cols=(0, 48))


# -- configs ---------------------------------------------------------------------------------------


def write_json(folder: Path, name: str, data: dict) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return folder


def test_read_quant_config_in_both_styles(tmp_path):
    arch = {"model_type": "llama", "hidden_size": 64}
    optimum = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}
    optimum |= {"damp_percent": 0.1, "use_exllama": True, "checkpoint_format": "gptq_v2"}
    folder = write_json(tmp_path / "optimum", "config.json", {**arch, "quantization_config": optimum})
    assert read_quant_config(folder) == QuantConfig("gptq", 4, 128, True, True, checkpoint_format="gptq_v2")

    autogptq = {"bits": 4, "group_size": -1, "desc_act": False, "sym": False, "static_groups": False}
    folder = write_json(
        write_json(tmp_path / "autogptq", "config.json", arch), "quantize_config.json", autogptq
    )
    assert read_quant_config(folder) == QuantConfig("gptq", 4, -1, False, False)

    autoawq = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    folder = write_json(tmp_path / "awq", "config.json", {**arch, "quantization_config": autoawq})
    assert read_quant_config(folder) == QuantConfig("awq", 4, 64, sym=False)

    old_awq = {"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"}
    folder = write_json(write_json(tmp_path / "old_awq", "config.json", arch), "quant_config.json", old_awq)
    assert read_quant_config(folder) == QuantConfig("awq", 4, 128, sym=False)

    assert read_quant_config(write_json(tmp_path / "float", "config.json", arch)) is None
    bnb = {**arch, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    assert read_quant_config(write_json(tmp_path / "bnb", "config.json", bnb)) is None
    eight = {**arch, "quantization_config": {**optimum, "bits": 8}}
    with pytest.raises(ValueError, match="8-bit"):
        read_quant_config(write_json(tmp_path / "eight", "config.json", eight))


# -- checkpoint folders ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_dir(tiny_models) -> Path:
    return tiny_models("llama")


@pytest.mark.parametrize("method", ["gptq", "gptq-act-order-legacy", "awq"])
def test_checkpoint_folders_and_their_reference(float_dir, tmp_path, method):
    if method == "awq":
        quant = write_awq_checkpoint(float_dir, tmp_path / "q", group=32)
    else:
        legacy = method != "gptq"
        quant = write_gptq_checkpoint(
            float_dir, tmp_path / "q", group=32, desc_act=legacy, legacy_config=legacy
        )
    cfg = read_quant_config(quant)
    assert cfg is not None and cfg.method == method[:4] and cfg.group_size == 32
    assert ("quantization_config" in json.loads((quant / "config.json").read_text())) != method.endswith(
        "legacy"
    )

    original, packed = load_file(float_dir / "model.safetensors"), load_file(quant / "model.safetensors")
    ref_dir = write_dequantized_reference(quant, tmp_path / "ref")
    reference = load_file(ref_dir / "model.safetensors")
    assert reference.keys() == original.keys()
    assert read_quant_config(ref_dir) is None
    linears = [name for name in original if name.split(".")[-2] in LINEARS]
    assert len(linears) == 2 * len(LINEARS)
    for name, tensor in original.items():
        if name in linears:
            prefix = name.removesuffix(".weight")
            assert f"{prefix}.weight" not in packed and packed[f"{prefix}.qweight"].dtype == torch.int32
            assert (f"{prefix}.g_idx" in packed) == (cfg.method == "gptq")
            assert reference[name].dtype == torch.float32 and reference[name].shape == tensor.shape
            assert (reference[name] - tensor).abs().max() <= packed[
                f"{prefix}.scales"
            ].float().max() / 2 + 1e-6
        else:
            assert torch.equal(packed[name], tensor) and torch.equal(reference[name], tensor)
    from tests.helpers import hf_logits

    assert torch.isfinite(hf_logits(ref_dir, [1, 5, 9], [])).all()  # transformers loads it


@pytest.mark.parametrize("desc_act", [False, True])
def test_each_linear_is_served_by_the_method_its_tensors_allow(float_dir, tmp_path, desc_act):
    """q/k/v stack into one 4-bit weight unless act-order sorted their inputs differently (each linear of
    this checkpoint has its own random order): then one dense weight. The LM head is float: dense."""
    quant = write_gptq_checkpoint(float_dir, tmp_path / "q", group=32, desc_act=desc_act)
    w = SafetensorsWeights(quant, torch.float32, torch.device("cpu"))
    attn = "model.layers.0.self_attn."
    qkv = w.linear_method([attn + n for n in ("q_proj", "k_proj", "v_proj")], None)
    assert type(qkv) is (DequantizedLinear if desc_act else QuantizedLinear)
    assert type(w.linear_method([attn + "o_proj"], (0, 32))) is QuantizedLinear
    assert type(w.linear_method(["lm_head"], None, head=True)) is DequantizedLinear
