"""What every architecture shares: where it runs, its tensor-parallel slice and its KV pages."""

from __future__ import annotations

from typing import Any

import torch

from tgi_zmq.attention import KVCache
from tgi_zmq.parallel import Shard


class PagedModel:
    """A model whose ``cfg`` has ``num_layers`` (layers with KV pages) and ``head_dim``; a subclass
    sets ``num_kv_heads``, the KV heads of this rank."""

    num_kv_heads: int

    def __init__(self, cfg: Any, dtype: torch.dtype, device: torch.device, shard: Shard):
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.shard = shard

    def new_cache(self, num_blocks: int, block_size: int) -> KVCache:
        c = self.cfg
        return KVCache(
            c.num_layers, num_blocks, block_size, self.num_kv_heads, c.head_dim, self.dtype, self.device
        )
