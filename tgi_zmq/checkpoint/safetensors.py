"""Tensors of a safetensors checkpoint (one file or several with an index), read one by one; a GPTQ/AWQ
checkpoint's 4-bit linears repacked into our format (``gptq``) as they are read.

Each file is opened with ``safe_open`` (memory-mapped) and a tensor is only read when the model asks for
it, so loading never holds a second full copy of the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from pathlib import Path

import torch
from safetensors import safe_open

from tgi_zmq.checkpoint.base import CheckpointReader, MissingTensorError
from tgi_zmq.checkpoint.gptq import awq_to_int4, gptq_to_int4, int4_layout, read_quant_config
from tgi_zmq.layers import Range
from tgi_zmq.quant import QUANTIZE
from tgi_zmq.quant.formats import ActOrder, Loaded, to_device
from tgi_zmq.quant.linear import QuantScheme

INDEX_FILE = "model.safetensors.index.json"


class SafetensorsWeights(CheckpointReader):
    """A model folder's safetensors; its linears served as ``quantize`` (a ``--quantize`` value) says,
    or in their own 4-bit blocks for a GPTQ/AWQ checkpoint (its ``quant_config``)."""

    def __init__(
        self, folder: str | Path, dtype: torch.dtype, device: torch.device, quantize: str | None = None
    ):
        folder = Path(folder)
        self.files = _tensor_files(folder)
        self._handles: dict[Path, object] = {}
        self.quant_config = read_quant_config(folder)
        if self.quant_config is not None:
            storage = "checkpoint"  # the checkpoint's own blocks, whatever ``quantize`` says
        else:
            storage = QUANTIZE[quantize].storage if quantize in QUANTIZE else None
        super().__init__(folder, self.files, dtype, device, QuantScheme(storage, device.type))

    def has(self, name: str) -> bool:
        return name in self.files

    def get(
        self, name: str, rows: Range = None, cols: Range = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Tensor ``name`` on the model's device, cast to ``dtype`` (None: the model's dtype; a
        quantized layer keeps its integers); MissingTensorError if absent.

        ``rows``/``cols``: read only that range of the first/second dimension (a tensor-parallel slice).
        """
        part = self._handle(name)
        self.used.add(name)
        if rows is None and cols is None:
            tensor = part.get_tensor(name)
        else:
            sliced = part.get_slice(name)
            r, c = slice(*rows) if rows else slice(None), slice(*cols) if cols else slice(None)
            tensor = sliced[r] if cols is None else sliced[r, c]
        tensor = tensor.to(dtype=dtype or self.dtype, device=self.device).contiguous()
        self._report_progress()
        return tensor

    def get_quantized(self, name: str, rows: Range = None, cols: Range = None) -> Loaded:
        """The checkpoint's own quantized form of ``<prefix>.weight`` (GPTQ/AWQ tensors, repacked:
        only this slice), else the tensor in the model's dtype (a quantized method quantizes it)."""
        prefix = name.removesuffix(".weight")
        if self.quant_config is None or not self.has(f"{prefix}.qweight"):
            return self.get(name, rows, cols)
        return self._repacked(prefix, rows, cols)

    def stored_format(self, name: str, cols: Range) -> Hashable | None:
        """None for a float tensor; a GPTQ/AWQ linear's ``int4_layout`` (group and input order)."""
        prefix = name.removesuffix(".weight")
        cfg = self.quant_config
        if cfg is None or not self.has(f"{prefix}.qweight"):
            return None
        k = self.shape(f"{prefix}.qweight")[0] * (8 if cfg.method == "gptq" else 1)
        return int4_layout(cfg, self._host(prefix, "g_idx", torch.int32), k, cols)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def _handle(self, name: str):
        """The open file holding ``name``; MissingTensorError if no file does."""
        if name not in self.files:
            raise MissingTensorError(self.folder, name)
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path]

    def _host(self, prefix: str, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Tensor ``<prefix>.<name>`` (read whole) on the host, None if the checkpoint has none."""
        full = f"{prefix}.{name}"
        return self.get(full, dtype=dtype).cpu() if self.has(full) else None

    def _repacked(self, prefix: str, rows: Range, cols: Range) -> Loaded:
        """A GPTQ/AWQ linear's tensors (read whole: they are 4-bit) repacked on the host into our 4-bit
        format, only the rows and input columns of this rank, then moved to the model's device."""
        cfg = self.quant_config
        qweight, qzeros, scales = (
            self._host(prefix, "qweight", torch.int32),
            self._host(prefix, "qzeros", torch.int32),
            self._host(prefix, "scales", torch.float32),
        )
        if cfg.method == "awq":
            return to_device(awq_to_int4(qweight, qzeros, scales, cfg, rows, cols), self.device)
        g_idx = self._host(prefix, "g_idx", torch.int32)
        weight, perm = gptq_to_int4(qweight, qzeros, scales, g_idx, cfg, rows, cols)
        weight = to_device(weight, self.device)
        return weight if perm is None else ActOrder(weight, perm.to(self.device))


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
