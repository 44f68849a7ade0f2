"""Shared-memory tensor transport: what one process writes another reads, bit for bit."""

import subprocess
import sys
import uuid

import pytest
import torch

from tgi_zmq.transport import SHM_DIR, ShmBuffer, TensorBuffer, TensorReader, TensorRing, remove_stale


@pytest.fixture
def prefix():
    name = f"tgi-zmq-test-{uuid.uuid4().hex[:8]}"
    yield name
    remove_stale(name)


def sample_tensors() -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.arange(10, dtype=torch.int64),
        "bias": torch.randn(3, 5),
        "flags": torch.tensor([True, False, True]),
        "half": torch.randn(4).to(torch.bfloat16),
        "empty": torch.zeros(0, dtype=torch.int64),
        "table": torch.arange(12, dtype=torch.int32).view(3, 4),
    }


def test_ring_round_trip_and_round_robin(prefix):
    ring = TensorRing(prefix, 2, 1 << 16)
    reader = TensorReader()
    tensors = sample_tensors()
    names = []
    for _ in range(3):
        name, refs, handle = ring.write(tensors)
        assert handle is None
        names.append(name)
        got = reader.read(name, refs)
        assert got.keys() == tensors.keys()
        for key, value in tensors.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value)
    assert names[0] == names[2] != names[1]
    reader.close()
    ring.close()
    assert not list(SHM_DIR.glob(prefix + "-*"))


def test_any_byte_tensor_is_a_buffer():
    """The packing is the base class's (``CudaIpcBuffer`` uses it on device bytes): here plain host bytes."""

    class Plain(TensorBuffer):
        def __init__(self, size: int):
            self.name, self.size, self.bytes = "plain", size, torch.zeros(size, dtype=torch.uint8)

        def close(self) -> None:
            pass

    buffer = Plain(1 << 12)
    tensors = sample_tensors()
    refs = buffer.write(tensors)
    assert all(ref.offset % 64 == 0 for ref in refs)
    got = buffer.read(refs)
    for key, value in tensors.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value)
    assert buffer.handle() is None and ShmBuffer.handle is TensorBuffer.handle


def test_another_process_reads_the_same_bytes(prefix):
    ring = TensorRing(prefix, 1, 1 << 16)
    name, refs, _ = ring.write({"x": torch.arange(1000, dtype=torch.int64)})
    code = (
        "import sys; from tgi_zmq.transport import TensorReader; from tgi_zmq.messages import TensorRef;"
        f"t = TensorReader().read({name!r}, [TensorRef('x', 'int64', [1000], {refs[0].offset})])['x'];"
        "print(int(t.sum()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == sum(range(1000))
    ring.close()


def test_overflow_and_out_of_bounds_refs_are_refused(prefix):
    ring = TensorRing(prefix, 1, 256)
    with pytest.raises(ValueError, match="need more than"):
        ring.write({"big": torch.zeros(100, dtype=torch.int64)})
    name, refs, _ = ring.write({"x": torch.zeros(4, dtype=torch.int64)})
    refs[0].shape = [10_000]
    with pytest.raises(ValueError, match="outside"):
        TensorReader().read(name, refs)
    with pytest.raises(ValueError, match="bad shared-memory name"):
        TensorReader().read("../etc/passwd", refs)
    ring.close()


def test_remove_stale(prefix):
    ShmBuffer(f"{prefix}-0", 64, create=True)
    remove_stale(prefix)
    assert not list(SHM_DIR.glob(prefix + "-*"))
