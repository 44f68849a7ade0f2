"""A GGUF file: opened memory-mapped (faster than gguf-py's own reader), one parsed reader per file within
a ``shared_gguf_reader`` block, its metadata; and the ``gguf.json`` marker of a model folder that serves
one as it is. Shared by the GGUF reader and the converter (``tgi_zmq.convert``); imports no torch.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguf import GGUFReader

GGUF_JSON = "gguf.json"
# general.architecture values served as they are -> the model_type (config.json's) that serves them. Their
# tensors need no more than renaming, llama's rotary rows and Gemma's norms (tgi_zmq.checkpoint.gguf);
# other files, convert them to safetensors with ``tgi-zmq convert``.
GGUF_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}


def is_gguf_folder(folder: Path) -> Path | None:
    """The GGUF file whose tensors a folder serves (its ``gguf.json``); None for any other folder."""
    marker = Path(folder) / GGUF_JSON
    if not marker.is_file():
        return None
    return Path(json.loads(marker.read_text(encoding="utf-8"))["gguf"])


def check_architecture(
    gguf_path: Path, arch: Any, served: Collection[str] = tuple(GGUF_MODEL_TYPES.values())
) -> None:
    """Refuse a GGUF not served as it is: of an architecture we do not read, or (``served``: the model
    types a model class serves) that no model serves."""
    accepted = [name for name, model_type in GGUF_MODEL_TYPES.items() if model_type in served]
    if arch not in accepted:
        raise ValueError(
            f"{gguf_path}: GGUF architecture {arch!r} is not served as it is (only "
            f"{', '.join(accepted)}); convert it to safetensors with `tgi-zmq convert`"
        )


def check_tensor_types(gguf_path: Path, reader: GGUFReader) -> None:
    """Refuse a GGUF holding a tensor type we cannot read: those repacked into our formats
    (tgi_zmq.checkpoint.gguf) or dequantized by gguf-py, and the float ones, are served."""
    from gguf.quants import _type_traits

    served = {"F32", "F16", *(kind.name for kind in _type_traits)}
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in served:
            raise ValueError(
                f"{gguf_path}: tensor {tensor.name} is of type {tensor.tensor_type.name}, which is not "
                f"served; served: {', '.join(sorted(served))}"
            )


def gguf_value(reader: GGUFReader, key: str) -> str | int | float | bool | None:
    """The scalar metadata value ``key`` of an open GGUF file (None if absent)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8") if field.types[0] == GGUFValueType.STRING else value[0].item()


def gguf_array(reader: GGUFReader, key: str) -> list[Any]:
    """The array metadata value ``key`` (the vocabulary's tokens, types...): each element's raw parts."""
    field = reader.fields[key]
    return [field.parts[i] for i in field.data]


_shared_readers: dict[Path, GGUFReader] = {}  # the files of the open ``shared_gguf_reader`` blocks


def open_gguf(gguf_path: Path) -> GGUFReader:
    """A ``gguf.GGUFReader`` of the file (memory-mapped), parsed ~4x faster than gguf's own; the shared
    one inside a ``shared_gguf_reader`` block."""
    path = Path(gguf_path).resolve()
    shared = _shared_readers.get(path)
    return shared if shared is not None else _fast_reader_class()(path)


@contextlib.contextmanager
def shared_gguf_reader(gguf_path: Path) -> Iterator[GGUFReader]:
    """Within the block, every reader of ``gguf_path`` (``open_gguf``, and transformers' loaders through
    ``gguf.GGUFReader``) is one parsed reader.

    Parsing the metadata (a vocabulary of tens of thousands of strings) is most of the time of reading a
    GGUF's config and tokenizer: transformers parses it once for the config and twice for the tokenizer.
    """
    import gguf

    path = Path(gguf_path).resolve()
    if path in _shared_readers:  # an enclosing block shares it already
        yield _shared_readers[path]
        return
    _shared_readers[path] = reader = open_gguf(path)
    original = gguf.GGUFReader

    def reader_of(file: str | Path, mode: str = "r") -> GGUFReader:
        shared = _shared_readers.get(Path(file).resolve())
        return shared if shared is not None and mode == "r" else original(file, mode)

    gguf.GGUFReader = reader_of
    try:
        yield reader
    finally:
        gguf.GGUFReader = original
        del _shared_readers[path]


@functools.cache
def _fast_reader_class() -> type[GGUFReader]:
    import numpy as np
    from gguf import GGUFReader

    class FastGGUFReader(GGUFReader):
        """Slices a plain ndarray view of the memory map: ``np.memmap``'s slicing (its
        ``__array_finalize__``) was three quarters of the parse. The tensors' data stays memory-mapped."""

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> Any:
            raw = self.__dict__.get("_raw")
            if raw is None:
                raw = self._raw = self.data.view(np.ndarray)
            dtype = np.dtype(dtype)
            arr = raw[offset : offset + dtype.itemsize * int(count)].view(dtype)
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

    return FastGGUFReader
