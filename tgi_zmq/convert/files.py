"""What every conversion writes and how: the cache folder, a streamed safetensors writer, config edits,
and the lock and atomic publish that keep a half-written model folder from ever looking complete."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tgi_zmq.dtypes import CONVERTED, DTYPES, name_of

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CACHE_ENV = "TGI_ZMQ_CACHE"


def cache_dir() -> Path:
    """``$TGI_ZMQ_CACHE`` if set, else ``~/.cache/tgi-zmq``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tgi-zmq"


def check_dtype(dtype: str) -> None:
    """Refuse, before any work, a dtype the converter does not write."""
    if dtype not in CONVERTED:
        raise ValueError(f"dtype must be one of {', '.join(CONVERTED)}, not {dtype!r}")


def check_out_dir(source: Path, out_dir: Path) -> None:
    """Refuse an output folder that holds the source: publishing replaces (deletes) the old folder."""
    source, target = source.resolve(), out_dir.resolve()
    if source == target or target in source.parents:
        raise ValueError(
            f"output folder {out_dir} holds the checkpoint being converted; choose another --out"
        )


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


def fsync_tree(folder: Path) -> None:
    """Flush the files to disk before the rename publishes them (a crash must not publish empty files)."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


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
            "dtype": DTYPES[name_of(tensor.dtype)].safetensors,
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


def edit_json(path: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    data = edit(json.loads(path.read_text(encoding="utf-8")))
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def with_dtype(config: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """config.json recording ``dtype`` (``dtype`` is the name transformers >= 4.56 writes)."""
    cfg = {**config, "torch_dtype": dtype}
    if "dtype" in cfg:
        cfg["dtype"] = dtype
    return cfg
