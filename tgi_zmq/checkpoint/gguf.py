"""Serve a GGUF file as it is: its quantized blocks repacked into our formats, tensor by tensor.

The model folder beside it (config, tokenizer, chat template, all from the GGUF, and ``gguf.json`` naming
the file) is written by ``tgi_zmq.convert.prepare_gguf_folder``; ``GGUFWeights`` reads the tensors from
the file itself. Nothing is dequantized to float but the tensors of types our formats do not hold (Q2_K,
Q3_K, the IQ types...) and the float ones (norms, biases).

Repacking is exact: GGUF's float16 scales (and the K-quants' 6- or 8-bit sub-scales times them) are
float32 values, the 5- and 6-bit codes fit a byte, and GGML's nibble order within 32 inputs is our
order, so ``dequantize()`` of what ``get_quantized`` gives equals ``gguf.quants.dequantize`` of the
same blocks.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

from tgi_zmq.block_manager import ceil_div
from tgi_zmq.checkpoint.base import CheckpointReader, MissingTensorError
from tgi_zmq.checkpoint.gguf_file import check_architecture, gguf_value, open_gguf
from tgi_zmq.layers import Range
from tgi_zmq.quant.formats import UNIFORM, Int4Weight, Int8Weight, to_device
from tgi_zmq.quant.linear import QuantScheme

if TYPE_CHECKING:
    from gguf import ReaderTensor

GROUP = 32  # the column slices of a repacked weight fall on these (a GGUF block; a K-quant sub-block)
# Per-layer GGUF names (blk.N.<name>) of the llama family (llama, mistral, qwen2/3) -> Hugging Face's.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 2 and 3 have four norms a layer: llama's ffn_norm is their pre-MLP norm.
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3's q|k|v rows are one tensor, and so are its gate|up rows (Hugging Face's qkv_proj and gate_up_proj):
# the model reads each rank's rows of every part from the one tensor, quantized blocks and all.
_PHI3_LAYER_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_LAYER_NAMES_OF = {"gemma2": _GEMMA_LAYER_NAMES, "gemma3": _GEMMA_LAYER_NAMES, "phi3": _PHI3_LAYER_NAMES}
# llama.cpp stores Gemma's norm weights as 1 + w (its norm multiplies by the weight); transformers
# subtracts the 1 again, and so do we (our Gemma norm adds it back, as transformers').
_ONE_PLUS_NORMS = ("gemma2", "gemma3")
_MODEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Mixtures of experts: a layer's router is ffn_gate_inp, and each projection of its experts is one 3-D tensor
# [experts, out, in], served as one tensor per expert under Hugging Face's per-expert names. By
# general.architecture (Mixtral's is llama's): the sparse block's name, and GGUF's stacked tensors' names.
_MOE_NAMES = {
    "llama": ("block_sparse_moe", {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}),
    "qwen3moe": (
        "mlp",
        {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"},
    ),
}
# Derived from the config's rope scaling by every loader (transformers ignores it too), or (Phi-3's LongRoPE
# factors) written into config.json by tgi_zmq.convert.gguf: never read as weights.
_IGNORED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def hf_tensors(tensors: list[ReaderTensor], arch: str) -> dict[str, ReaderTensor]:
    """A GGUF file's tensors by their Hugging Face names (``hf_name``; a name outside the mapping kept),
    an MoE's stacked expert tensors split into one 2-D tensor per expert (views of the file's planes)."""
    block, stacked = _MOE_NAMES.get(arch, ("", {}))
    named = {}
    for tensor in tensors:
        base, _, suffix = tensor.name.rpartition(".")
        parts = base.split(".")
        layer = f"model.layers.{parts[1]}.{block}" if len(parts) == 3 and parts[0] == "blk" else None
        if layer and parts[2] in stacked and len(tensor.shape) == 3:
            for e in range(int(tensor.shape[2])):
                named[f"{layer}.experts.{e}.{stacked[parts[2]]}.{suffix}"] = _expert(tensor, e)
        elif layer and block and parts[2] == "ffn_gate_inp":
            named[f"{layer}.gate.{suffix}"] = tensor
        else:
            named[hf_name(tensor.name, arch) or tensor.name] = tensor
    return named


def _expert(tensor: ReaderTensor, e: int) -> ReaderTensor:
    """Expert ``e``'s plane of a stacked [experts, out, in] tensor, as a 2-D tensor of the file."""
    experts = int(tensor.shape[2])
    return tensor._replace(
        name=f"{tensor.name}[{e}]",
        shape=tensor.shape[:2],
        n_elements=tensor.n_elements // experts,
        n_bytes=tensor.n_bytes // experts,
        data=tensor.data[e],
    )


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor of ``arch`` (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); None for names outside the mapping."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    layer_names = _LAYER_NAMES_OF.get(arch, _LAYER_NAMES)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{suffix}"
    if base in _MODEL_NAMES:
        return f"{_MODEL_NAMES[base]}.{suffix}"
    return None


class GGUFWeights(CheckpointReader):
    """The tensors of a GGUF file by their Hugging Face names, served in the file's own blocks. The file
    is memory-mapped; each call reads and converts only the slice it asks for (each tensor-parallel rank
    its own)."""

    def __init__(self, gguf_path: str | Path, dtype: torch.dtype, device: torch.device):
        path = Path(gguf_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        reader = open_gguf(path)
        arch = gguf_value(reader, "general.architecture")
        check_architecture(path, arch)
        self.path = path
        self.tensors = hf_tensors(reader.tensors, arch)
        self._one_plus_norms = arch in _ONE_PLUS_NORMS
        super().__init__(path, self.tensors, dtype, device, QuantScheme("checkpoint", device.type))
        # llama.cpp's converter interleaves the rotary halves of q/k rows of "llama" models (mistral too);
        # transformers' GGUF loader undoes it: heads of each tensor whose rows must be un-permuted.
        self._rotary_heads: dict[str, int] = {}
        if arch == "llama":  # as transformers: only when the file gives the head counts
            heads = gguf_value(reader, "llama.attention.head_count")
            kv_heads = gguf_value(reader, "llama.attention.head_count_kv") or heads
            for name in self.tensors if heads else ():
                if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
                    self._rotary_heads[name] = heads if ".q_proj." in name else kv_heads
        self.used.update(name for name in _IGNORED if name in self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(
        self, name: str, rows: Range = None, cols: Range = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Tensor ``name`` (its ``rows`` x ``cols`` slice) dequantized, in ``dtype`` (None: the model's)."""
        tensor = self._tensor(name)
        return self._done(self._float(name, tensor, rows, cols).to(dtype or self.dtype))

    def get_quantized(
        self, name: str, rows: Range = None, cols: Range = None
    ) -> Int8Weight | Int4Weight | torch.Tensor:
        """The slice as our format, repacked from the file's blocks: Q8_0, Q5_0, Q5_1, Q5_K (group 32)
        and Q6_K (group 16) -> ``Int8Weight``; Q4_0, Q4_1, Q4_K -> ``Int4Weight`` (group 32). Any other
        type: the float tensor in the model's dtype.

        ``cols`` of a repacked tensor must fall on 32-input boundaries.
        """
        tensor = self._tensor(name)
        repack = _REPACKERS.get(tensor.tensor_type.name)
        if repack is None or len(tensor.shape) != 2:
            return self._done(self._float(name, tensor, rows, cols).to(self.dtype))
        k = int(tensor.shape[0])
        c0, c1 = cols or (0, k)
        if c0 % GROUP or c1 % GROUP or not 0 <= c0 < c1 <= k:
            raise ValueError(
                f"{name}: input columns [{c0}, {c1}) must lie in [0, {k}) on {GROUP}-input boundaries"
            )
        raw, first = _blocks(tensor, self._row_ids(name, tensor, rows), c0, c1)
        weight = repack(raw, first // GROUP, (c1 - c0) // GROUP)
        return self._done(weight)

    def stored_format(self, name: str, cols: Range) -> Hashable | None:
        """What ``get_quantized`` repacks the tensor into (``_FORMATS``: alike ones stack), from its GGUF
        type; None for a type it dequantizes."""
        tensor = self.tensors.get(name)
        return None if tensor is None or len(tensor.shape) != 2 else _FORMATS.get(tensor.tensor_type.name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            raise MissingTensorError(self.folder, name)
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def _tensor(self, name: str) -> ReaderTensor:
        if name not in self.tensors:
            raise MissingTensorError(self.folder, name)
        self.used.add(name)
        return self.tensors[name]

    def _row_ids(self, name: str, tensor: ReaderTensor, rows: tuple[int, int] | None) -> slice | np.ndarray:
        """The file rows of output rows [lo, hi): the same, or un-permuted for llama's q/k."""
        n = int(tensor.shape[-1])
        lo, hi = rows or (0, n)
        heads = self._rotary_heads.get(name)
        if heads is None:
            return slice(lo, hi)
        # transformers' _reverse_permute_weights: w.reshape(heads, dim, 2, ...).swapaxes(2, 1)
        return np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(-1)[lo:hi]

    def _float(
        self, name: str, tensor: ReaderTensor, rows: tuple[int, int] | None, cols: tuple[int, int] | None
    ) -> torch.Tensor:
        """The slice as float32, by ``gguf.quants.dequantize`` of only the blocks that hold it."""
        ids = self._row_ids(name, tensor, rows)
        if len(tensor.shape) == 1:  # norms and biases: small
            values = dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(-1)[ids]
            if self._one_plus_norms and name.endswith("norm.weight"):
                values = values - np.float32(1)
        else:
            k = int(tensor.shape[0])
            c0, c1 = cols or (0, k)
            raw, first = _blocks(tensor, ids, c0, c1)
            values = dequantize(raw, tensor.tensor_type)[:, first : first + c1 - c0]
        return torch.from_numpy(np.array(values, dtype=np.float32))

    def _done(self, value: Any) -> Any:
        """``value`` on the model's device; logs progress at each quarter of the tensors read."""
        value = (
            value.to(self.device).contiguous()
            if isinstance(value, torch.Tensor)
            else to_device(value, self.device)
        )
        self._report_progress()
        return value


def _blocks(tensor: ReaderTensor, ids: slice | np.ndarray, c0: int, c1: int) -> tuple[np.ndarray, int]:
    """The rows ``ids`` of the blocks holding input columns [c0, c1), and where c0 falls in them."""
    block, size = GGML_QUANT_SIZES[tensor.tensor_type]
    b0, b1 = c0 // block, ceil_div(c1, block)
    per_block = size if tensor.data.dtype == np.uint8 else 1  # bytes, or values of a float type
    return np.ascontiguousarray(tensor.data[ids, b0 * per_block : b1 * per_block]), c0 - b0 * block


def _halves(raw: np.ndarray, size: int, *fields: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Blocks of ``size`` bytes split into float16 fields (as float32 [rows, blocks]) and the rest."""
    blocks = raw.reshape(raw.shape[0], -1, size)
    values = [np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16)[..., 0] for at in fields]
    return [v.astype(np.float32) for v in values], blocks[..., 2 * len(fields) :]


def _int8(
    codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, group: int, g0: int, ng: int
) -> Int8Weight:
    """Our Int8Weight of 32-input groups [g0, g0 + ng) of codes [rows, inputs] (int8 values) and their
    scales (and offsets) of one per ``group`` inputs."""
    per = GROUP // group

    def part(values: np.ndarray, width: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values[:, g0 * width : (g0 + ng) * width]))

    return Int8Weight(
        part(codes.reshape(codes.shape[0], -1).astype(np.int8), GROUP),
        part(scales.reshape(scales.shape[0], -1), per),
        group,
        None if offsets is None else part(offsets.reshape(offsets.shape[0], -1), per),
    )


def _q8_0(raw: np.ndarray, g0: int, ng: int) -> Int8Weight:
    """Q8_0: a float16 scale and 32 int8 codes per block; w = q * scale."""
    (scale,), codes = _halves(raw, 34, 0)
    return _int8(codes.view(np.int8), scale, None, GROUP, g0, ng)


def _low_high(nibbles: np.ndarray) -> np.ndarray:
    """16 bytes [..., 16] -> 32 codes [..., 32]: the low nibbles then the high ones (GGML's order)."""
    return np.concatenate([nibbles & 15, nibbles >> 4], axis=-1)


def _q5(rest: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 bytes of fifth bits (bit i: input i) and 16 of nibbles -> codes 0..31 [.., 32]."""
    high = np.unpackbits(rest[..., :4], axis=-1, bitorder="little")
    return _low_high(rest[..., 4:]) | (high << 4)


def _q5_0(raw: np.ndarray, g0: int, ng: int) -> Int8Weight:
    """Q5_0: float16 d, 5-bit codes; w = (q - 16) * d."""
    (d,), rest = _halves(raw, 22, 0)
    return _int8(_q5(rest).astype(np.int8) - 16, d, None, GROUP, g0, ng)


def _q5_1(raw: np.ndarray, g0: int, ng: int) -> Int8Weight:
    """Q5_1: float16 d and m, 5-bit codes; w = q * d + m."""
    (d, m), rest = _halves(raw, 24, 0, 2)
    return _int8(_q5(rest), d, m, GROUP, g0, ng)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K and Q5_K's 12 bytes [rows, supers, 12] -> 8 six-bit scales and mins each, as float32 (ggml's
    get_scale_min_k4)."""
    rows, supers = packed.shape[:2]
    s = packed.reshape(rows, supers, 3, 4)
    low, high, extra = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([low & 63, (extra & 15) | ((low >> 2) & 48)], axis=-1)
    mn = np.concatenate([high & 63, (extra >> 4) | ((high >> 2) & 48)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q5_k(raw: np.ndarray, g0: int, ng: int) -> Int8Weight:
    """Q5_K: 256-input superblocks of float16 d and dmin, 8 sub-blocks of 32 with 6-bit scale ``sc`` and
    min ``m`` (12 bytes), 32 bytes of fifth bits (bit j of byte i: input i of sub-block j) and 128 of
    nibbles (as Q4_K's): w = q * (d sc) - dmin m."""
    (d, dmin), rest = _halves(raw, 176, 0, 2)
    rows, supers = d.shape
    sc, mn = _k_scales(rest[..., :12])
    high = np.unpackbits(rest[..., 12:44, None], axis=-1, bitorder="little")  # [rows, supers, 32, 8]
    high = high.transpose(0, 1, 3, 2)  # [rows, supers, sub-block, input]
    low = rest[..., 44:].reshape(rows, supers, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
    codes = (low & 15).reshape(rows, supers, 8, 32) | (high << 4)
    return _int8(codes, d[..., None] * sc, -(dmin[..., None] * mn), GROUP, g0, ng)


def _q6_k(raw: np.ndarray, g0: int, ng: int) -> Int8Weight:
    """Q6_K: 256-input superblocks of 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales
    ``sc`` (one per 16 inputs) and float16 d: w = (q - 32) * (d sc). Sub-block 4c + i (of 32 inputs) has
    its low nibbles in bytes 64c + 32(i % 2).. shifted by 4(i // 2), its high bits in bytes 32c.. shifted
    by 2i."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 210)
    supers = blocks.shape[1]
    d = np.ascontiguousarray(blocks[..., 208:]).view(np.float16)[..., 0].astype(np.float32)
    low = blocks[..., :128].reshape(rows, supers, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    high = blocks[..., 128:192].reshape(rows, supers, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(
        4, 1
    )
    codes = (low & 15).reshape(rows, supers, 8, 32) | ((high & 3).reshape(rows, supers, 8, 32) << 4)
    sc = blocks[..., 192:208].view(np.int8).astype(np.float32)
    return _int8(codes.astype(np.int8) - 32, d[..., None] * sc, None, GROUP // 2, g0, ng)


def _int4(packed: np.ndarray, scales: np.ndarray, offsets: np.ndarray, g0: int, ng: int) -> Int4Weight:
    """Our Int4Weight of groups [g0, g0 + ng) of packed nibbles [rows, groups, 16] (GGML order)."""
    rows = packed.shape[0]
    part = slice(g0, g0 + ng)
    return Int4Weight(
        torch.from_numpy(np.ascontiguousarray(packed[:, part]).reshape(rows, ng * 16)),
        torch.from_numpy(np.ascontiguousarray(scales[:, part])),
        torch.from_numpy(np.ascontiguousarray(offsets[:, part])),
        UNIFORM.clone(),
        GROUP,
    )


def _q4_0(raw: np.ndarray, g0: int, ng: int) -> Int4Weight:
    """Q4_0: float16 d and 16 bytes of nibbles per block; w = (q - 8) * d = q * d + (-8 d), exactly."""
    (d,), packed = _halves(raw, 18, 0)
    return _int4(packed, d, -8 * d, g0, ng)


def _q4_1(raw: np.ndarray, g0: int, ng: int) -> Int4Weight:
    """Q4_1: float16 d and m, 16 bytes of nibbles per block; w = q * d + m."""
    (d, m), packed = _halves(raw, 20, 0, 2)
    return _int4(packed, d, m, g0, ng)


def _q4_k(raw: np.ndarray, g0: int, ng: int) -> Int4Weight:
    """Q4_K: 256-input superblocks of float16 d and dmin, 8 sub-blocks of 32 with 6-bit scale ``sc`` and
    min ``m`` (12 bytes), and 128 bytes of nibbles: w = q * (d sc) - dmin m. Bytes 32j..32j+31 hold
    sub-block 2j in their low nibbles and 2j+1 in their high ones; repacked to GGML's order per 32."""
    (d, dmin), rest = _halves(raw, 144, 0, 2)
    rows, supers = d.shape
    sc, mn = _k_scales(rest[..., :12])
    qs = rest[..., 12:].reshape(rows, supers, 4, 1, 32)
    codes = np.concatenate([qs & 15, qs >> 4], axis=3)  # [rows, supers, 4, 2, 32]: sub-blocks in order
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    scales = (d[..., None] * sc).reshape(rows, -1)
    offsets = -(dmin[..., None] * mn).reshape(rows, -1)
    return _int4(packed.reshape(rows, supers * 8, 16), scales, offsets, g0, ng)


_REPACKERS = {
    "Q8_0": _q8_0,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q4_K": _q4_k,
}
# What each repacks to, the formats of stored_format: the types of one format stack with one another
_FORMATS = {
    "Q8_0": "int8",  # group 32, no offsets
    "Q5_0": "int8",
    "Q5_1": "int8+offsets",  # group 32
    "Q5_K": "int8+offsets",
    "Q6_K": "int8/16",  # group 16, no offsets
    "Q4_0": "int4",  # group 32, uniform codes
    "Q4_1": "int4",
    "Q4_K": "int4",
}
