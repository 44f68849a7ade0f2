"""Shared-memory tensor transport: bulk per-step tensors cross processes without copies on the socket.

The producer owns a ``TensorRing`` of a few fixed-size slots, packs a step's tensors into
one slot and sends only ``TensorRef`` headers (name, dtype, shape, offset) over ZeroMQ.
The consumer maps the same buffer once and views the tensors in place.

A slot is reused only after the consumer has answered for the step that used it
(the scheduler waits for a step's result before reusing its slot), so no locking is needed.

Both kinds of buffer are a ``TensorBuffer`` (the packing and the views): on CPU POSIX shared
memory (``ShmBuffer``, files in /dev/shm, mmap'd, found by name); on CUDA a device allocation
shared by CUDA IPC handle (``CudaIpcBuffer``), chosen by the device switch of ``TensorRing``.
Steps always travel in host shared memory (each worker copies them to its own device); a worker's
results travel in a CUDA buffer on its GPU. ``TensorRing.write`` returns the buffer's CUDA handle
with every write, so it rides in every result header (it is built once per buffer, and a few
hundred bytes); ``TensorReader`` opens it the first time it sees the buffer's name and ignores it
afterwards.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np
import torch

from tgi_zmq.block_manager import ceil_div
from tgi_zmq.dtypes import DTYPES, name_of, to_torch
from tgi_zmq.messages import TensorRef

SHM_DIR = Path("/dev/shm")
_ALIGN = 64
# the dtypes numpy has (not bfloat16, nor the 8-bit floats): those go through numpy's cheaper slices
_NUMPY = frozenset(("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"))
_NUMPY_TORCH = {to_torch(name) for name in _NUMPY}


class TensorBuffer:
    """A flat byte buffer shared between processes: tensors packed one after another (64-byte
    aligned), each described by a ``TensorRef``. A subclass sets ``name``, ``size`` and ``bytes``
    (a uint8 tensor over the whole buffer) and says how the buffer is opened and closed."""

    name: str
    size: int
    bytes: torch.Tensor

    def write(self, tensors: dict[str, torch.Tensor]) -> list[TensorRef]:
        """Pack tensors one after the other (64-byte aligned) and return their headers."""
        refs, offset = [], 0
        for name, tensor in tensors.items():
            tensor = tensor.contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if offset + nbytes > self.size:
                raise ValueError(f"step tensors need more than the {self.size} bytes of {self.name}")
            if nbytes:
                self._put(offset, nbytes, tensor)
            refs.append(TensorRef(name, name_of(tensor.dtype), list(tensor.shape), offset))
            offset += ceil_div(nbytes, _ALIGN) * _ALIGN
        return refs

    def _put(self, offset: int, nbytes: int, tensor: torch.Tensor) -> None:
        self.bytes[offset : offset + nbytes].copy_(tensor.view(-1).view(torch.uint8))

    def _view(self, offset: int, nbytes: int, dtype: str, shape: list[int]) -> torch.Tensor:
        return self.bytes[offset : offset + nbytes].view(to_torch(dtype)).view(shape)

    def read(self, refs: list[TensorRef]) -> dict[str, torch.Tensor]:
        """Views (no copy) of the tensors described by ``refs``."""
        out = {}
        for ref in refs:
            numel = 1
            for dim in ref.shape:
                numel *= dim
            nbytes = numel * DTYPES[ref.dtype].size
            if ref.offset < 0 or ref.offset + nbytes > self.size:
                raise ValueError(f"tensor {ref.name} lies outside {self.name}")
            out[ref.name] = self._view(ref.offset, nbytes, ref.dtype, ref.shape)
        return out

    def handle(self) -> list | None:
        """What another process needs besides the name to open this buffer (None: the name is enough)."""
        return None

    def close(self) -> None:
        raise NotImplementedError


class ShmBuffer(TensorBuffer):
    """One named shared-memory file mapped into this process."""

    def __init__(self, name: str, size: int, create: bool):
        self.name = name
        self.path = SHM_DIR / name
        self.owner = create
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self.mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        self.bytes = torch.frombuffer(self.mmap, dtype=torch.uint8)
        self.array = np.frombuffer(self.mmap, dtype=np.uint8)  # numpy's slices and views cost a third

    def _put(self, offset: int, nbytes: int, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _NUMPY_TORCH:
            return super()._put(offset, nbytes, tensor)
        self.array[offset : offset + nbytes] = tensor.numpy().view(np.uint8).reshape(-1)

    def _view(self, offset: int, nbytes: int, dtype: str, shape: list[int]) -> torch.Tensor:
        if dtype not in _NUMPY:
            return super()._view(offset, nbytes, dtype, shape)
        return torch.from_numpy(self.array[offset : offset + nbytes].view(dtype).reshape(shape))

    def close(self) -> None:
        del self.bytes, self.array
        try:
            self.mmap.close()
        except BufferError:  # tensors read from it are alive: unmapped with the last of them
            pass
        if self.owner:
            self.path.unlink(missing_ok=True)


class CudaIpcBuffer(TensorBuffer):
    """A device buffer shared between processes by CUDA IPC handle (GPU path only).

    The owner allocates ``size`` bytes on its device and publishes ``handle()``, a list of
    plain values (ints, bytes, bools) that fits in a msgpack header; another process rebuilds
    a tensor aliasing the same device memory with ``CudaIpcBuffer.open``. Writes synchronise
    the device before the header is sent, so the reader never sees a half-written step.
    """

    def __init__(self, name: str, size: int, device: torch.device, storage=None):
        if storage is None:
            storage = torch.empty(size, dtype=torch.uint8, device=device).untyped_storage()
        self.name = name
        self.device = device
        self.storage = storage
        self.bytes = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
        self.size = storage.nbytes()
        self._handle: list | None = None

    def handle(self) -> list:
        """The IPC handle (the same private call ``torch.multiprocessing`` makes), built on first use."""
        if self._handle is None:
            self._handle = list(self.storage._share_cuda_())
        return self._handle

    @classmethod
    def open(cls, name: str, handle: list) -> CudaIpcBuffer:
        storage = torch.UntypedStorage._new_shared_cuda(*handle)
        return cls(name, 0, storage.device, storage)

    def write(self, tensors: dict[str, torch.Tensor]) -> list[TensorRef]:
        refs = super().write(tensors)
        torch.cuda.synchronize(self.device)
        return refs

    def close(self) -> None:
        del self.bytes, self.storage


class FrameBuffer(TensorBuffer):
    """A slot's bytes received in a message (``--nnodes``: a rank on another node gets its steps over
    TCP, not in shared memory); read like the slot it was copied from."""

    def __init__(self, frame: bytes) -> None:
        self.name, self.size = "frame", len(frame)
        self.bytes = (
            torch.frombuffer(bytearray(frame), dtype=torch.uint8)
            if frame
            else torch.empty(0, dtype=torch.uint8)
        )

    def close(self) -> None:
        pass


def packed_size(refs: list[TensorRef]) -> int:
    """The bytes of a buffer that ``refs`` cover, from its start."""
    return max((ref.offset + math.prod(ref.shape) * DTYPES[ref.dtype].size for ref in refs), default=0)


class TensorRing:
    """``slots`` producer-owned buffers used round-robin, one per in-flight step.

    Host shared memory, or CUDA IPC buffers when ``device`` is a GPU (then the consumer gets
    device tensors without a host round trip).
    """

    def __init__(self, prefix: str, slots: int, slot_size: int, device: str = "cpu"):
        dev = torch.device(device)
        if dev.type == "cuda":
            self.buffers = [CudaIpcBuffer(f"{prefix}-{i}", slot_size, dev) for i in range(slots)]
        else:
            self.buffers = [ShmBuffer(f"{prefix}-{i}", slot_size, create=True) for i in range(slots)]
        self.next = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> tuple[str, list[TensorRef], list | None]:
        """Pack a step's tensors into the next slot: (buffer name, tensor headers, CUDA handle)."""
        buffer = self.buffers[self.next]
        self.next = (self.next + 1) % len(self.buffers)
        return buffer.name, buffer.write(tensors), buffer.handle()

    def copy(self, name: str, refs: list[TensorRef]) -> bytes:
        """The packed bytes of host slot ``name``, for a consumer that cannot map it."""
        buffer = next(b for b in self.buffers if b.name == name)
        return bytes(buffer.mmap[: packed_size(refs)])

    def close(self) -> None:
        for buffer in self.buffers:
            buffer.close()


class TensorReader:
    """Consumer side: maps each producer buffer once, on first use."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.buffers: dict[str, TensorBuffer] = {}

    def read(self, name: str, refs: list[TensorRef], handle: list | None = None) -> dict[str, torch.Tensor]:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad shared-memory name {name!r}")
        if name not in self.buffers:
            if handle is None:
                self.buffers[name] = ShmBuffer(name, 0, create=False)
            else:
                self.buffers[name] = CudaIpcBuffer.open(name, handle)
        return self.buffers[name].read(refs)

    def close(self) -> None:
        for buffer in self.buffers.values():
            buffer.close()


def remove_stale(prefix: str) -> None:
    """Delete leftovers of a service that was killed before it could unlink its buffers."""
    for path in SHM_DIR.glob(f"{prefix}-*"):
        path.unlink(missing_ok=True)
