"""Tensor element types by name: one table for the launcher, the converter, KV sizing and the transport.

A name is torch's own (``str(torch.bfloat16)`` without ``torch.``), so it travels in JSON and in wire
messages as is. torch is imported only when a torch dtype is asked for: the launcher and
``tgi_zmq.convert``'s fast path stay light.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch


class DType(NamedTuple):
    size: int  # bytes per element
    safetensors: str  # its code in a .safetensors header


DTYPES: dict[str, DType] = {
    "float64": DType(8, "F64"),
    "float32": DType(4, "F32"),
    "float16": DType(2, "F16"),
    "bfloat16": DType(2, "BF16"),
    "float8_e5m2": DType(1, "F8_E5M2"),
    "float8_e4m3fn": DType(1, "F8_E4M3"),
    "int64": DType(8, "I64"),
    "int32": DType(4, "I32"),
    "int16": DType(2, "I16"),
    "int8": DType(1, "I8"),
    "uint8": DType(1, "U8"),
    "bool": DType(1, "BOOL"),
}
SERVED = ("float32", "bfloat16", "float16")  # what --dtype resolves to: the weights and the KV cache
CONVERTED = ("float32", "bfloat16")  # what ``tgi-zmq convert --dtype`` writes


@functools.cache
def to_torch(name: str) -> torch.dtype:
    """The torch dtype called ``name``; KeyError for a name outside the table (e.g. from the wire)."""
    import torch

    if name not in DTYPES:
        raise KeyError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return getattr(torch, name)


@functools.cache
def name_of(dtype: torch.dtype) -> str:
    """The table's name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")
