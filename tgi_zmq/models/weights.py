"""Tensors of a safetensors checkpoint (one file or several with an index), read one by one.

Each file is opened with ``safe_open`` (memory-mapped) and a tensor is only read when the model asks for
it, so loading never holds a second full copy of the checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from tgi_zmq.layers import LinearMethod
    from tgi_zmq.quant.gptq import QuantConfig
    from tgi_zmq.quant.linear import Loaded

INDEX_FILE = "model.safetensors.index.json"
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


class Weights:
    def __init__(self, folder: str | Path, dtype: torch.dtype, device: torch.device):
        self.folder = Path(folder)
        self.files = _tensor_files(self.folder)
        self.dtype = dtype
        self.device = device
        self._handles: dict[Path, object] = {}
        self.used: set[str] = set()
        self.quant_config = read_quant_config(self.folder)
        # how the linears (and the LM head) hold their weights; None: dense, in ``dtype``
        self.linear_method: LinearMethod | None = None
        self.head_method: LinearMethod | None = None
        self._started = time.perf_counter()
        self._next_report = 0.25  # loading progress is logged at each quarter of the tensors

    def has(self, name: str) -> bool:
        return name in self.files

    def get(
        self,
        name: str,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Tensor ``name`` on the model's device, cast to ``dtype`` (None: the model's dtype; a
        quantized layer keeps its integers); MissingTensorError if absent.

        ``rows``/``cols``: read only that range of the first/second dimension (a tensor-parallel slice).
        """
        if name not in self.files:
            raise MissingTensorError(self.folder, name)
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        self.used.add(name)
        if rows is None and cols is None:
            tensor = self._handles[path].get_tensor(name)
        else:
            part = self._handles[path].get_slice(name)
            r, c = slice(*rows) if rows else slice(None), slice(*cols) if cols else slice(None)
            tensor = part[r] if cols is None else part[r, c]
        tensor = tensor.to(dtype=dtype or self.dtype, device=self.device).contiguous()
        self._report_progress()
        return tensor

    def get_quantized(
        self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> Loaded:
        """The checkpoint's own quantized form of ``<prefix>.weight`` (GPTQ/AWQ tensors, repacked:
        only this slice), else the tensor in the model's dtype (a quantized method quantizes it)."""
        prefix = name.removesuffix(".weight")
        if self.quant_config is None or not self.has(f"{prefix}.qweight"):
            return self.get(name, rows, cols)
        return self._repacked(prefix, rows, cols)

    def _repacked(self, prefix: str, rows: tuple[int, int] | None, cols: tuple[int, int] | None) -> Loaded:
        """A GPTQ/AWQ linear's tensors (read whole: they are 4-bit) repacked on the host into our 4-bit
        format, only the rows and input columns of this rank, then moved to the model's device."""
        from tgi_zmq.quant.formats import to_device
        from tgi_zmq.quant.gptq import awq_to_int4, gptq_to_int4
        from tgi_zmq.quant.linear import ActOrder

        def host(name: str, dtype: torch.dtype) -> torch.Tensor | None:
            return self.get(f"{prefix}.{name}", dtype=dtype).cpu() if self.has(f"{prefix}.{name}") else None

        cfg = self.quant_config
        qweight, qzeros, scales = (
            host("qweight", torch.int32),
            host("qzeros", torch.int32),
            host("scales", torch.float32),
        )
        if cfg.method == "awq":
            return to_device(awq_to_int4(qweight, qzeros, scales, cfg, rows, cols), self.device)
        weight, perm = gptq_to_int4(qweight, qzeros, scales, host("g_idx", torch.int32), cfg, rows, cols)
        weight = to_device(weight, self.device)
        return weight if perm is None else ActOrder(weight, perm.to(self.device))

    def mark_used(self, name: str) -> None:
        """Count ``name`` as read without reading it (a tensor only another rank holds, a saved copy
        of a shared one), so that it is not reported as unused."""
        if name in self.files:
            self.used.add(name)

    def _report_progress(self) -> None:
        done = len(self.used) / len(self.files)
        if done >= self._next_report:
            elapsed = time.perf_counter() - self._started
            log.info(
                "loaded %d/%d tensors (%.0f%%) in %.1fs", len(self.used), len(self.files), done * 100, elapsed
            )
            while self._next_report <= done:
                self._next_report += 0.25

    def unused(self) -> list[str]:
        """Checkpoint tensors the model did not read (reported at load time)."""
        return sorted(set(self.files) - self.used)


def read_quant_config(folder: Path) -> QuantConfig | None:
    from tgi_zmq.quant.gptq import read_quant_config as read

    return read(folder)


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index if there is one, else from every file's header."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
        missing = sorted({path.name for path in files.values() if not path.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} lists files that are not there: {', '.join(missing)}")
        return files
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    files: dict[str, Path] = {}
    for path in paths:
        with safe_open(path, "pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    return files
