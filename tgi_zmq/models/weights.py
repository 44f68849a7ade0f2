"""Tensors of a safetensors checkpoint (one file or several with an index), read one by one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class Weights:
    def __init__(self, folder: str | Path, dtype: torch.dtype, device: torch.device):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: folder / file for name, file in weight_map.items()}
        else:
            paths = sorted(folder.glob("*.safetensors"))
            if not paths:
                raise FileNotFoundError(f"no *.safetensors file in {folder}")
            files = {}
            for path in paths:
                with safe_open(path, "pt") as f:
                    files.update(dict.fromkeys(f.keys(), path))
        self.files = files
        self.dtype = dtype
        self.device = device
        self._handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        self.used.add(name)
        tensor = self._handles[path].get_tensor(name)
        return tensor.to(dtype=self.dtype, device=self.device).contiguous()

    def unused(self) -> list[str]:
        """Checkpoint tensors the model did not read (reported at load time)."""
        return sorted(set(self.files) - self.used)
