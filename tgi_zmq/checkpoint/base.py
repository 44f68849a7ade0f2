"""What every checkpoint reader shares: the tensors read so far (the rest are reported unused), loading
progress, and the linear method of each layer, chosen by the ``QuantScheme`` from how the reader stores
the layer's parts."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Hashable, Sequence
from pathlib import Path

import torch

from tgi_zmq.layers import LinearMethod, Range
from tgi_zmq.quant.linear import QuantScheme

log = logging.getLogger(__name__)


class MissingTensorError(KeyError):
    """The model asked for a tensor that the checkpoint does not have."""

    def __init__(self, folder: Path, name: str):
        super().__init__(name)
        self.folder = folder
        self.name = name

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return (
            f"checkpoint {self.folder} has no tensor {self.name!r} "
            "(the checkpoint does not match this architecture or is incomplete)"
        )


class CheckpointReader:
    """Base of the readers (each a ``tgi_zmq.layers.WeightSource``). A subclass reads tensors (``has``,
    ``get``, ``get_quantized``, calling ``_report_progress``) and says how it stores a linear's weight
    (``stored_format``) and its shape."""

    def __init__(
        self,
        folder: Path,
        names: Collection[str],
        dtype: torch.dtype,
        device: torch.device,
        scheme: QuantScheme,
    ):
        self.folder = folder  # what error messages name
        self.names = names  # of every tensor in the checkpoint
        self.dtype = dtype
        self.device = device
        self.scheme = scheme
        self.used: set[str] = set()
        self._started = time.perf_counter()
        self._next_report = 0.25  # loading progress is logged at each quarter of the tensors

    def stored_format(self, name: str, cols: Range) -> Hashable | None:
        """How the checkpoint stores tensor ``name`` (read with input columns ``cols``): None as floats;
        parts of a linear whose formats are equal stack into one quantized weight."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        """Tensor ``name``'s shape (Hugging Face's order: [out, in] for a linear), without reading it."""
        raise NotImplementedError

    def linear_method(self, prefixes: Sequence[str], cols: Range, head: bool = False) -> LinearMethod:
        def in_features() -> int:
            return cols[1] - cols[0] if cols else self.shape(f"{prefixes[0]}.weight")[1]

        stored = [self.stored_format(f"{p}.weight", cols) for p in prefixes]
        return self.scheme.method(prefixes[0], stored, in_features, head)

    def mark_used(self, name: str) -> None:
        """Count ``name`` as read without reading it (a tensor only another rank holds, a saved copy
        of a shared one), so that it is not reported as unused."""
        if name in self.names:
            self.used.add(name)

    def unused(self) -> list[str]:
        """Checkpoint tensors the model did not read (reported at load time)."""
        return sorted(set(self.names) - self.used)

    def _report_progress(self) -> None:
        done = len(self.used) / len(self.names)
        if done >= self._next_report:
            elapsed = time.perf_counter() - self._started
            log.info(
                "loaded %d/%d tensors (%.0f%%) in %.1fs", len(self.used), len(self.names), done * 100, elapsed
            )
            while self._next_report <= done:
                self._next_report += 0.25
