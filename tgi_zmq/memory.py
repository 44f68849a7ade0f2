"""How many KV-cache tokens fit: sizing the page pool from a memory budget, as TGI and vLLM do.

Without ``--max-batch-total-tokens`` the pool gets a fraction of the memory that is free once
the weights are in: available RAM on CPU (the KV tensors are mapped lazily, so untouched pages
cost nothing), free device memory on GPU. The weights' size is read from the safetensors
headers (at the served dtype), so the launcher can decide before any process starts and every
process reads the same limits.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ACTIVATION_RESERVE = 1 << 30  # bytes kept for activations, logits and the runtime


def cache_geometry(hf: dict) -> tuple[int, int, int]:
    """(layers with KV pages, KV heads, head dim), read by the architecture's own config class.

    T5's pages hold the decoder layers' self-attention and, in other pages, their cross-attention K/V.
    """
    from tgi_zmq.models import architecture

    cfg = architecture(hf)[0].from_hf(hf)
    return cfg.num_layers, cfg.num_kv_heads, cfg.head_dim


def kv_bytes_per_token(hf_config: dict, dtype: str) -> int:
    """K and V of one token over all layers."""
    layers, kv_heads, head_dim = cache_geometry(hf_config)
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def weights_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes of every floating-point tensor once cast to ``dtype`` (from the safetensors headers)."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            total += numel * DTYPE_BYTES[dtype]
    return total


def free_memory(device: str) -> int:
    """Bytes free now: MemAvailable on CPU, free device memory on GPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def kv_budget_tokens(model_dir: Path, hf_config: dict, dtype: str, device: str, fraction: float) -> int:
    """Tokens of KV cache that ``fraction`` of the memory left after the weights can hold."""
    left = free_memory(device) - weights_bytes(model_dir, dtype) - ACTIVATION_RESERVE
    return max(0, int(left * fraction) // kv_bytes_per_token(hf_config, dtype))
