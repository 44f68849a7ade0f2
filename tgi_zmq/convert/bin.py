"""PyTorch ``.bin`` checkpoints -> safetensors, one shard at a time.

The pickles are read with ``torch.load(weights_only=True)`` only: one that holds anything but tensors and
plain containers is refused, never executed.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tgi_zmq.convert.files import (
    build_and_publish,
    check_dtype,
    check_out_dir,
    edit_json,
    fsync_tree,
    with_dtype,
    write_safetensors,
)
from tgi_zmq.dtypes import to_torch

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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
    from tqdm import tqdm

    tmp.mkdir(parents=True)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tied = bool(config.get("tie_word_embeddings", True))  # transformers' default when the key is absent
    torch_dtype = to_torch(dtype) if dtype else None
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
    fsync_tree(tmp)


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
        edit_json(out / "config.json", lambda config: with_dtype(config, dtype))
    if not any(out.glob("tokenizer*")):
        log.warning("%s has no tokenizer files: the server needs them next to the weights", folder)
