"""GGUF files served as they are (tgi_zmq.checkpoint.gguf): blocks repacked exactly, names and rotary rows as
transformers loads them, and the folder of config and tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open

from tests.helpers import hf_greedy, run_engine
from tgi_zmq import convert, models
from tgi_zmq.checkpoint.base import MissingTensorError
from tgi_zmq.checkpoint.gguf import GGUFWeights, hf_name
from tgi_zmq.checkpoint.gguf_file import gguf_value, is_gguf_folder, shared_gguf_reader
from tgi_zmq.convert import prepare_gguf_folder
from tgi_zmq.layers import Linear, ParallelLMHead, VocabParallelEmbedding, WeightSource
from tgi_zmq.messages import SamplingParams
from tgi_zmq.parallel import Shard
from tgi_zmq.quant.formats import Int4Weight, Int8Weight
from tgi_zmq.quant.linear import DequantizedLinear, QuantizedLinear
from tgi_zmq.rope import RopeConfig

CPU = torch.device("cpu")
PROMPT = "The capital of France is Paris"
OUT, IN = 48, 512  # IN: two Q4_K superblocks
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


# Where each K-quant's float16 super-scales lie in its block (gguf-py has no quantizer for them)
SUPER_SCALES = {Q.Q4_K: (0, 4), Q.Q5_K: (0, 4), Q.Q6_K: (-2, None), Q.Q2_K: (-4, None)}


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a K-quant tensor with finite float16 super-scales (every code and sub-scale)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    at, end = SUPER_SCALES[qtype]
    halves = rng.uniform(0.001, 0.05, (rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    raw[..., at:end] = halves[..., : (end or 0) - at]
    return raw.reshape(rows, -1)


def encode(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    if qtype in SUPER_SCALES:
        return random_blocks(qtype, *values.shape, rng)
    return gguf.quants.quantize(values, qtype)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "llama") -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference(path: Path, name: str) -> torch.Tensor:
    """gguf-py's dequantization of a whole tensor, as float32 [out, in]."""
    (tensor,) = [t for t in gguf.GGUFReader(path).tensors if t.name == name]
    return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32))


# Each repacked type: our format, group and whether it has offsets
REPACKED = {
    Q.Q8_0: (Int8Weight, 32, False),
    Q.Q5_0: (Int8Weight, 32, False),
    Q.Q5_1: (Int8Weight, 32, True),
    Q.Q5_K: (Int8Weight, 32, True),
    Q.Q6_K: (Int8Weight, 16, False),
    Q.Q4_0: (Int4Weight, 32, True),
    Q.Q4_1: (Int4Weight, 32, True),
    Q.Q4_K: (Int4Weight, 32, True),
}
QUANTIZED = list(REPACKED)
FLOATS = [Q.F32, Q.F16, Q.BF16]
OTHERS = [Q.Q2_K]


@pytest.fixture(scope="module")
def blocks_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ffn_up of layer i stored as type i (llama names, but no q/k: no rotary permutation)."""
    rng = np.random.default_rng(0)
    tensors = {}
    for i, qtype in enumerate(QUANTIZED + FLOATS + OTHERS):
        values = rng.normal(0, 0.1, (OUT, IN)).astype(np.float32)
        data = values.astype(np.float16) if qtype == Q.F16 else values
        tensors[f"blk.{i}.ffn_up.weight"] = (
            data if qtype in (Q.F32, Q.F16) else encode(values, qtype, rng),
            qtype,
        )
    tensors["output_norm.weight"] = (rng.normal(size=IN).astype(np.float32), Q.F32)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "blocks.gguf", tensors)


def up(qtype: Q) -> str:
    return f"model.layers.{(QUANTIZED + FLOATS + OTHERS).index(qtype)}.mlp.up_proj.weight"


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
@pytest.mark.parametrize(
    ("rows", "cols"),
    [
        (None, None),
        ((5, 29), None),
        (None, (32, 96)),
        ((0, 16), (224, 480)),
        ((47, 48), (256, 512)),
        ((0, 24), None),  # two ranks' rows
        ((24, 48), None),
        (None, (0, 256)),  # two ranks' inputs
        (None, (256, 512)),
    ],
)
def test_quantized_slices_repack_exactly(blocks_file: Path, qtype: Q, rows, cols) -> None:
    w = GGUFWeights(blocks_file, torch.float32, CPU)
    got = w.get_quantized(up(qtype), rows, cols)
    fmt, group, offsets = REPACKED[qtype]
    assert type(got) is fmt and got.group == group and got.scales.dtype == torch.float32
    assert (got.offsets is not None) == offsets
    if isinstance(got, Int4Weight):
        assert torch.equal(got.lut, torch.arange(16, dtype=torch.float32))
    else:
        assert got.qweight.dtype == torch.int8
    expected = reference(blocks_file, f"blk.{QUANTIZED.index(qtype)}.ffn_up.weight")
    r, c = slice(*(rows or (None,))), slice(*(cols or (None,)))
    assert torch.equal(got.dequantize(), expected[r, c])
    assert torch.equal(w.get(up(qtype), rows, cols), expected[r, c])


@pytest.mark.parametrize("qtype", FLOATS + OTHERS, ids=lambda q: q.name)
def test_other_types_come_as_float_in_the_model_dtype(blocks_file: Path, qtype: Q) -> None:
    w = GGUFWeights(blocks_file, torch.bfloat16, CPU)
    expected = reference(blocks_file, f"blk.{(QUANTIZED + FLOATS + OTHERS).index(qtype)}.ffn_up.weight")
    got = w.get_quantized(up(qtype), (3, 40), (5, 300))  # float: any columns
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected[3:40, 5:300].bfloat16())
    assert torch.equal(w.get(up(qtype), dtype=torch.float32), expected)


def test_quantized_columns_must_fall_on_groups(blocks_file: Path) -> None:
    w = GGUFWeights(blocks_file, torch.float32, CPU)
    for cols in [(16, 64), (0, 100), (0, IN + 32)]:
        with pytest.raises(ValueError, match="32-input boundaries"):
            w.get_quantized(up(Q.Q4_K), cols=cols)
    expected = reference(blocks_file, f"blk.{QUANTIZED.index(Q.Q4_K)}.ffn_up.weight")
    assert torch.equal(w.get(up(Q.Q4_K), cols=(16, 70)), expected[:, 16:70])  # dequantized: any columns


def test_names_usage_and_missing_tensors(blocks_file: Path) -> None:
    w = GGUFWeights(blocks_file, torch.float32, CPU)
    assert w.has("model.norm.weight") and not w.has("lm_head.weight")
    assert w.get("model.norm.weight", rows=(4, 9)).shape == (5,)
    w.mark_used(up(Q.Q8_0))
    assert "model.norm.weight" not in w.unused() and up(Q.Q8_0) not in w.unused()
    assert up(Q.Q4_0) in w.unused()
    with pytest.raises(MissingTensorError, match="blocks.gguf has no tensor 'lm_head.weight'"):
        w.get_quantized("lm_head.weight")
    assert (w.dtype, w.device, w.folder) == (torch.float32, CPU, blocks_file)
    assert isinstance(w, WeightSource)


@pytest.mark.parametrize(
    ("qtypes", "method"),
    [
        ([Q.Q4_K, Q.Q4_0, Q.Q4_1], QuantizedLinear),  # all Int4Weight of group 32: one weight
        ([Q.Q8_0], QuantizedLinear),
        ([Q.Q5_0, Q.Q5_0, Q.Q8_0], QuantizedLinear),  # Gemma 3 Q4_K_M's q|k|v: int8 of group 32
        ([Q.Q5_K, Q.Q5_1], QuantizedLinear),  # int8 with offsets
        ([Q.Q6_K], QuantizedLinear),
        ([Q.Q4_K, Q.Q6_K], DequantizedLinear),  # a Q6_K v beside Q4_K q/k: dense
        ([Q.Q5_K, Q.Q5_K, Q.Q6_K], DequantizedLinear),  # scales per 16 beside offsets
        ([Q.Q5_0, Q.Q5_1], DequantizedLinear),  # offsets or none
        ([Q.Q8_0, Q.Q6_K], DequantizedLinear),  # groups of 32 and 16
        ([Q.Q8_0, Q.Q4_0], DequantizedLinear),
        ([Q.Q5_0, Q.Q2_K], DequantizedLinear),
        ([Q.F16], DequantizedLinear),
    ],
    ids=lambda v: "-".join(q.name for q in v) if isinstance(v, list) else v.__name__,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_linear_is_served_by_the_method_its_blocks_allow(
    blocks_file: Path, qtypes, method, dtype
) -> None:
    w = GGUFWeights(blocks_file, dtype, CPU)
    prefixes = [up(q).removesuffix(".weight") for q in qtypes]
    assert type(w.linear_method(prefixes, None)) is method
    assert type(w.linear_method(prefixes, None, head=True)) is method
    assert not w.used  # deciding reads no tensor
    layer = Linear(w, [(p, None) for p in prefixes])
    assert type(layer.method) is method
    files = [f"blk.{(QUANTIZED + FLOATS + OTHERS).index(q)}.ffn_up.weight" for q in qtypes]
    dense = torch.cat([reference(blocks_file, name) for name in files])
    if method is DequantizedLinear:
        dense = dense.to(dtype).float()  # served in the model's dtype
    for m in (1, 4, 64):  # decode (fused kernel), prefill (dequantized + BLAS)
        x = torch.randn(m, IN, generator=torch.Generator().manual_seed(m)).to(dtype)
        tol = 1e-5 if dtype == torch.float32 else 1.5e-2  # of |x| @ |w|^T: summation order, bfloat16 out
        bound = x.float().abs() @ dense.abs().T
        assert ((layer(x).float() - x.float() @ dense.T).abs() <= tol * bound + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [None, 0, 1], ids=["1-rank", "rank0of2", "rank1of2"])
def test_a_tied_quantized_head_is_the_embeddings_table(tmp_path: Path, dtype, rank) -> None:
    """Gemma's Q8_0 token_embd is embedding and LM head: one int8 table, the head by our int8 kernel."""
    vocab = 100
    table = np.random.default_rng(2).normal(0, 0.1, (vocab, 64)).astype(np.float32)
    path = write_gguf(
        tmp_path / "tied.gguf", {"token_embd.weight": (gguf.quants.quantize(table, Q.Q8_0), Q.Q8_0)}
    )
    w = GGUFWeights(path, dtype, CPU)
    shard = Shard() if rank is None else Shard(rank, 2)
    embed = VocabParallelEmbedding(w, "model.embed_tokens.weight", shard, vocab)
    head = ParallelLMHead(w, "lm_head", shard, vocab, tied=embed)
    assert isinstance(embed.weight, Int8Weight) and isinstance(head.method, QuantizedLinear)
    assert head.qweight.weight.qweight.data_ptr() == embed.weight.qweight.data_ptr()  # one copy
    assert head.qweight.weight.scales.data_ptr() == embed.weight.scales.data_ptr()
    assert head.qweight.forced is None and head.qweight.kernel(1, dtype) == "fused"
    lo, hi = shard.split(vocab)
    expected = reference(path, "token_embd.weight")[lo:hi]
    assert torch.equal(embed.weight.dequantize(), expected)
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits = head.method.apply(head, h, float_out=True)  # this rank's slice (the gather needs ranks)
    assert logits.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    bound = h.float().abs() @ expected.abs().T
    assert ((logits - h.float() @ expected.T).abs() <= tol * bound + 1e-6).all()


def test_the_int8_head_reads_only_the_rows_that_sample(tiny_models, monkeypatch) -> None:
    """A step's prompt tokens reach the LM head only where they sample (the last of each prompt)."""
    from tgi_zmq.messages import SamplingParams

    rows: list[int] = []  # of x in each int8 matmul (the layers' and the head's)
    apply = QuantizedLinear.apply
    monkeypatch.setattr(
        QuantizedLinear, "apply", lambda s, layer, x, **k: rows.append(len(x)) or apply(s, layer, x, **k)
    )
    heads: list[int] = []
    call = ParallelLMHead.__call__
    monkeypatch.setattr(ParallelLMHead, "__call__", lambda self, h: heads.append(len(h)) or call(self, h))
    prompts = [[3 + i + j for j in range(20)] for i in range(3)]
    run_engine(tiny_models("llama"), prompts, [SamplingParams()] * 3, 4, quantize="eetq")
    assert heads and max(heads) <= 3  # the first step's 60 prompt tokens: 3 logit rows
    assert max(rows) > 3  # the layers' int8 matmuls took the prompts' tokens


@pytest.mark.parametrize(
    ("gguf_name", "expected"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output.weight", "lm_head.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("blk.12.attn_q.bias", "model.layers.12.self_attn.q_proj.bias"),
        ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight"),
        ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
        ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight"),
        ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
        ("rope_freqs.weight", None),
        ("blk.3.ffn_gate_exps.weight", None),
    ],
)
def test_hf_names(gguf_name: str, expected: str | None) -> None:
    assert hf_name(gguf_name) == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rotary_rows_are_unpermuted_for_llama_only(tmp_path: Path, arch: str) -> None:
    """transformers' GGUF loader un-permutes llama's q/k rows (weights and biases); so must we."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(1)
    shapes = {"attn_q": HEADS * HEAD_DIM, "attn_k": KV_HEADS * HEAD_DIM, "attn_v": KV_HEADS * HEAD_DIM}
    tensors = {}
    for part, rows in shapes.items():
        values = rng.normal(0, 0.1, (rows, 64)).astype(np.float32)
        tensors[f"blk.0.{part}.weight"] = (gguf.quants.quantize(values, Q.Q4_1), Q.Q4_1)
        tensors[f"blk.0.{part}.bias"] = (rng.normal(size=rows).astype(np.float32), Q.F32)
    path = write_gguf(tmp_path / f"{arch}.gguf", tensors, arch)
    processor = LlamaTensorProcessor({"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    w = GGUFWeights(path, torch.float32, CPU)
    for part, hf in [("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")]:
        for kind in ("weight", "bias"):
            name = f"blk.0.{part}.{kind}"
            stored = reference(path, name)
            expected = stored if arch != "llama" else processor.process(stored.numpy(), name).weights
            expected = torch.as_tensor(expected)
            hf_name = f"model.layers.0.self_attn.{hf}.{kind}"
            assert torch.equal(w.get(hf_name), expected), hf_name
            assert torch.equal(
                w.get(hf_name, rows=(HEAD_DIM, 2 * HEAD_DIM)), expected[HEAD_DIM : 2 * HEAD_DIM]
            )
            if kind == "weight":
                got = w.get_quantized(hf_name, rows=(HEAD_DIM, 2 * HEAD_DIM), cols=(32, 64))
                assert torch.equal(got.dequantize(), expected[HEAD_DIM : 2 * HEAD_DIM, 32:64])
    if arch == "llama":  # the permutation is not the identity
        assert not torch.equal(
            w.get("model.layers.0.self_attn.q_proj.weight"), reference(path, "blk.0.attn_q.weight")
        )


def test_other_architectures_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_gguf(
        tmp_path / "falcon.gguf", {"output_norm.weight": (np.ones(64, np.float32), Q.F32)}, "falcon"
    )
    with pytest.raises(ValueError, match="architecture 'falcon' is not served as it is.*tgi-zmq convert"):
        GGUFWeights(path, torch.float32, CPU)
    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="architecture 'falcon'"):
        prepare_gguf_folder(path)
    assert not list((tmp_path / "cache" / "gguf").iterdir())


def test_an_architecture_no_model_serves_is_refused_before_any_file_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qwen3's tensors are named like llama's: refused while no model class serves it."""
    path = write_gguf(
        tmp_path / "qwen3.gguf", {"output_norm.weight": (np.ones(64, np.float32), Q.F32)}, "qwen3"
    )
    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path / "cache"))
    served = {k: v for k, v in models.ARCHITECTURES.items() if k != "qwen3"}
    monkeypatch.setattr(models, "ARCHITECTURES", served)
    with pytest.raises(
        ValueError,
        match=r"'qwen3' is not served as it is \(only llama, qwen2, qwen3moe, gemma2, gemma3, phi3\)",
    ):
        prepare_gguf_folder(path)
    assert not list((tmp_path / "cache" / "gguf").iterdir())


# ------------------------------------------------------------------------------------ the default model


@pytest.fixture(scope="module")
def default_weights() -> GGUFWeights:
    return GGUFWeights(convert.find_bundled_gguf(), torch.float32, CPU)


@pytest.fixture(scope="module")
def converted() -> Path:
    """The float32 folder transformers' dequantization made of the same file."""
    return convert.ensure_default_model()


@pytest.mark.parametrize(
    ("name", "rows", "cols"),
    [
        ("model.embed_tokens.weight", (1000, 1200), None),  # Q8_0, tied: no lm_head
        ("model.layers.0.self_attn.q_proj.weight", None, None),
        ("model.layers.7.self_attn.k_proj.weight", (64, 128), (288, 576)),  # one kv head, half the inputs
        ("model.layers.7.self_attn.v_proj.weight", None, None),
        ("model.layers.29.mlp.down_proj.weight", (0, 288), (768, 1536)),
        ("model.layers.3.input_layernorm.weight", None, None),
        ("model.norm.weight", None, None),
    ],
)
def test_default_model_matches_its_conversion(
    default_weights: GGUFWeights, converted: Path, name: str, rows, cols
) -> None:
    with safe_open(converted / "model.safetensors", "pt") as f:
        expected = f.get_tensor(name)
    if rows:
        expected = expected[slice(*rows)]
    if cols:
        expected = expected[:, slice(*cols)]
    got = default_weights.get_quantized(name, rows, cols)
    got = got if isinstance(got, torch.Tensor) else got.dequantize()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not default_weights.has("lm_head.weight")


def test_default_model_tensors_are_all_named(default_weights: GGUFWeights, converted: Path) -> None:
    with safe_open(converted / "model.safetensors", "pt") as f:
        assert set(default_weights.tensors) == set(f.keys())


def test_prepare_gguf_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, converted: Path) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path))
    source = convert.find_bundled_gguf()
    folder = prepare_gguf_folder(source)
    assert folder.parent == tmp_path / "gguf" and folder.name.startswith(source.stem + "-")
    assert is_gguf_folder(folder) == source.resolve()
    assert json.loads((folder / "gguf.json").read_text()) == {"gguf": str(source.resolve())}
    assert not list(folder.glob("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert config["rope_theta"] == 100000.0 and "quantization_config" not in config
    assert (folder / "generation_config.json").read_text() == (
        converted / "generation_config.json"
    ).read_text()
    ours, theirs = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(converted)
    assert ours(PROMPT)["input_ids"] == theirs(PROMPT)["input_ids"] == [504, 3575, 282, 4649, 314, 7042]
    assert ours.chat_template == theirs.chat_template and ours.chat_template
    assert (ours.eos_token, ours.bos_token) == ("<|im_end|>", "<|im_start|>")

    monkeypatch.setattr("tgi_zmq.convert.gguf._write_gguf_folder", pytest.fail)
    assert prepare_gguf_folder(source) == folder  # made once
    assert is_gguf_folder(converted) is None

    from tgi_zmq.memory import rank_memory  # the KV budget counts each rank's share of the file's blocks

    ranks = rank_memory(folder, config, "float32", "cpu", 2)
    assert [r.weights for r in ranks] == [-(-source.stat().st_size // 2)] * 2


def test_a_tensor_type_we_cannot_read_is_refused_before_any_file_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An int32 tensor (GGUF type I32): neither repacked nor dequantized by gguf-py."""
    tensors = {
        "output_norm.weight": (np.ones(64, np.float32), Q.F32),
        "blk.0.odd": (np.ones(64, np.int32), Q.I32),
    }
    path = write_gguf(tmp_path / "odd.gguf", tensors)
    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(
        ValueError, match=r"tensor blk.0.odd is of type I32, which is not served; served: .*Q4_K"
    ):
        prepare_gguf_folder(path)
    assert not list((tmp_path / "cache" / "gguf").iterdir())


# ------------------------------------------------------------------------------------------------ Phi-3

# Hugging Face's Phi-3 names -> llama.cpp's (convert_hf_to_gguf.py's Phi3MiniModel), each with the type
# it is stored in here: q|k|v and gate|up fused and quantized, so that each rank's rows of each part
# come from one tensor's blocks.
PHI3_LAYER = {
    "self_attn.qkv_proj": ("attn_qkv", Q.Q8_0),
    "self_attn.o_proj": ("attn_output", Q.F16),
    "mlp.gate_up_proj": ("ffn_up", Q.Q8_0),
    "mlp.down_proj": ("ffn_down", Q.Q8_0),
    "input_layernorm": ("attn_norm", Q.F32),
    "post_attention_layernorm": ("ffn_norm", Q.F32),
}
PHI3_MODEL = {
    "model.embed_tokens": ("token_embd", Q.F16),
    "model.norm": ("output_norm", Q.F32),
    "lm_head": ("output", Q.Q8_0),
}
# A SentencePiece vocabulary as llama.cpp writes Phi-3's: control tokens, 256 byte tokens, pieces
# (scores falling with the id), unused pads up to the model's vocabulary, Phi-3's chat tokens last.
PHI3_PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyz.,", "▁t", "he", "▁the", "▁c", "at", "▁cat"]
PHI3_CHAT = ["<|endoftext|>", "<|user|>", "<|end|>", "<|assistant|>"]
PHI3_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
)


def phi3_vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and GGUF token types (1 normal, 3 control, 5 unused, 6 byte)."""
    pads = size - 3 - 256 - len(PHI3_PIECES) - len(PHI3_CHAT)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *PHI3_PIECES]
    tokens += [f"[PAD{i}]" for i in range(pads)] + PHI3_CHAT
    scores = [0.0] * 259 + [-float(i) for i in range(len(PHI3_PIECES))]
    scores += [-10000.0] * pads + [-1000.0] * len(PHI3_CHAT)
    types = [3] * 3 + [6] * 256 + [1] * len(PHI3_PIECES) + [5] * pads + [3] * len(PHI3_CHAT)
    return tokens, scores, types


def phi3_tensors(folder: Path) -> tuple[dict[str, tuple[np.ndarray, Q]], dict[str, torch.Tensor]]:
    """A tiny Phi-3's tensors by GGUF names in their stored types, and the same values dequantized by
    Hugging Face names (the reference's weights)."""
    from safetensors.torch import load_file

    stored, dequantized = {}, {}
    for name, w in load_file(folder / "model.safetensors").items():
        prefix = name.removesuffix(".weight")
        if prefix.startswith("model.layers."):
            layer, part = prefix.removeprefix("model.layers.").split(".", 1)
            short, qtype = PHI3_LAYER[part]
            gguf_name = f"blk.{layer}.{short}.weight"
        else:
            short, qtype = PHI3_MODEL[prefix]
            gguf_name = f"{short}.weight"
        values = w.float().numpy()
        if qtype == Q.F32:
            data = values
        elif qtype == Q.F16:
            data = values.astype(np.float16)
        else:
            data = gguf.quants.quantize(values, qtype)
        stored[gguf_name] = (data, qtype)
        dequantized[name] = torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), np.float32))
    return stored, dequantized


def write_phi3_gguf(folder: Path, path: Path) -> Path:
    """The tiny Phi-3 at ``folder`` as llama.cpp's converter writes it: its metadata (Phi3MiniModel's
    set_gguf_parameters), the LongRoPE factors as rope_factors tensors, a SentencePiece vocabulary."""
    hf = json.loads((folder / "config.json").read_text())
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_name("Phi 3 Tiny")
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_rope_scaling_orig_ctx_len(hf["original_max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_rope_dimension_count(int(hf["partial_rotary_factor"] * head_dim))
    writer.add_rope_freq_base(hf["rope_theta"])
    writer.add_sliding_window(hf["sliding_window"] or 0)
    original = hf["original_max_position_embeddings"]
    scale = hf["max_position_embeddings"] / original
    writer.add_rope_scaling_attn_factors(np.sqrt(1 + np.log(scale) / np.log(original)) if scale > 1 else 1.0)
    tokens, scores, types = phi3_vocabulary(hf["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(tokens.index("<|end|>"))
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(True)
    writer.add_chat_template(PHI3_TEMPLATE)
    stored, _ = phi3_tensors(folder)
    rope = hf["rope_scaling"]
    stored["rope_factors_long.weight"] = (np.array(rope["long_factor"], np.float32), Q.F32)
    stored["rope_factors_short.weight"] = (np.array(rope["short_factor"], np.float32), Q.F32)
    for name, (data, qtype) in stored.items():
        writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    return path


@pytest.fixture(scope="module")
def phi3(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Phi-3 (LongRoPE's short factors) as a GGUF file, the folder serving it as it is, and
    the reference: transformers' checkpoint of the file's weights dequantized."""
    from safetensors.torch import save_file

    original = tiny_models("phi3")
    tmp = tmp_path_factory.mktemp("phi3")
    path = write_phi3_gguf(original, tmp / "phi3.gguf")
    reference = tmp / "reference"
    reference.mkdir()
    shutil.copy(original / "config.json", reference / "config.json")
    save_file(phi3_tensors(original)[1], reference / "model.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(convert.CACHE_ENV, str(tmp / "cache"))
        served = prepare_gguf_folder(path)
    return {"original": original, "gguf": path, "served": served, "reference": reference}


PHI3_FIELDS = [  # config.json's fields that make the model (rms_norm_eps: a float32 in the file)
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
    "original_max_position_embeddings", "rope_theta", "rope_scaling", "sliding_window",
    "partial_rotary_factor", "tie_word_embeddings", "hidden_act",
]  # fmt: skip


def assert_phi3_config(served: Path, original: Path) -> None:
    ours, theirs = (json.loads((f / "config.json").read_text()) for f in (served, original))
    assert {k: ours.get(k) for k in PHI3_FIELDS} == {k: theirs.get(k) for k in PHI3_FIELDS}
    assert ours["rms_norm_eps"] == pytest.approx(theirs["rms_norm_eps"], rel=1e-6)


def test_a_phi3_gguf_serves_transformers_tokens_from_its_quantized_blocks(phi3) -> None:
    assert_phi3_config(phi3["served"], phi3["original"])
    with safe_open(phi3["reference"] / "model.safetensors", "pt") as f:  # every tensor named
        factors = {"rope_factors_long.weight", "rope_factors_short.weight"}  # config.json's LongRoPE
        assert set(GGUFWeights(phi3["gguf"], torch.float32, CPU).tensors) == set(f.keys()) | factors
    model = models.load_model(phi3["served"], "float32", "cpu")
    for layer in model.layers:  # q|k|v and gate|up: one tensor each in the file, int8 blocks in the model
        assert type(layer.qkv.method) is QuantizedLinear and type(layer.gate_up.method) is QuantizedLinear
    assert type(model.layers[0].o.method) is DequantizedLinear  # F16
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(3, 512, n)] for n in (5, 17, 29)]
    expected = [hf_greedy(phi3["reference"], p, 8) for p in prompts]
    assert run_engine(phi3["served"], prompts, [SamplingParams()] * 3, 8)[0] == expected


def test_a_phi3_gguf_on_two_ranks_gives_the_tokens_of_one(phi3, two_ranks) -> None:
    prompts = [[5, 9, 200, 31], [400, 3, 77, 12, 90, 8, 150], [33, 7]]
    tokens = two_ranks.run(phi3["served"], prompts, [SamplingParams()] * len(prompts))
    assert tokens == [hf_greedy(phi3["reference"], p, 8) for p in prompts]


def test_a_long_context_phi3_gguf_config_has_its_long_factors_and_window(
    tiny_models, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """128k-style: the context past the original one (the long factors serve), and a sliding window."""
    original = tiny_models("phi3", max_position_embeddings=4096, sliding_window=8)
    path = write_phi3_gguf(original, tmp_path / "long.gguf")
    with shared_gguf_reader(path) as reader:
        assert gguf_value(reader, "phi3.rope.scaling.attn_factor") == pytest.approx(
            RopeConfig.from_hf(models.read_config(original), 16).inv_freq()[1]
        )  # what the file says is what the config gives
    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path / "cache"))
    served = prepare_gguf_folder(path)
    assert_phi3_config(served, original)
    assert_phi3_config(convert.convert_gguf(path, tmp_path / "converted"), original)  # dequantized alike
    (ours, our_factor), (theirs, their_factor) = (
        RopeConfig.from_hf(models.read_config(f), 16).inv_freq() for f in (served, original)
    )
    assert torch.equal(ours, theirs) and our_factor == their_factor > 1


def test_a_phi3_gguf_tokenizer_reads_its_sentencepiece_vocabulary_as_llama_cpp(phi3) -> None:
    """Llama 2's normalizer ("▁" for spaces and before the text), byte fallback, and the whitespace after
    Phi-3's chat tokens dropped (llama.cpp's rule)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(phi3["served"])
    tokens, _, _ = phi3_vocabulary(512)
    ids = tokens.index
    byte = lambda b: 3 + b  # noqa: E731
    assert tokenizer("the cat")["input_ids"] == [1, ids("▁the"), ids("▁cat")]
    assert tokenizer("Hé, at")["input_ids"] == [
        1, ids("▁"), byte(0x48), byte(0xC3), byte(0xA9), ids(","), ids("▁"), ids("at"),
    ]  # fmt: skip
    chat = "<|user|>\nthe cat<|end|>\n<|assistant|>\n"
    expected = [1, ids("<|user|>"), ids("▁the"), ids("▁cat"), ids("<|end|>"), ids("<|assistant|>")]
    assert tokenizer(chat)["input_ids"] == expected
    assert tokenizer.decode(tokenizer("Hé, the cat")["input_ids"], skip_special_tokens=True) == "Hé, the cat"
    assert (tokenizer.eos_token, tokenizer.bos_token, len(tokenizer)) == ("<|end|>", "<s>", 512)
    assert tokenizer.chat_template == PHI3_TEMPLATE


def test_a_phi3_gguf_of_another_vocabulary_is_refused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Phi-4's files are phi3 GGUFs with a GPT-2 vocabulary, which transformers' Phi-3 reader misreads."""
    writer = gguf.GGUFWriter(tmp_path / "phi4.gguf", "phi3")
    writer.add_tokenizer_model("gpt2")
    writer.add_tensor("output_norm.weight", np.ones(64, np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="phi3 GGUF with a 'gpt2' vocabulary"):
        prepare_gguf_folder(tmp_path / "phi4.gguf")
    assert not list((tmp_path / "cache" / "gguf").iterdir())
