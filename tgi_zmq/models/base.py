"""What every architecture shares: its launch rules, where it runs, its tensor-parallel slice and its
KV pages."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tgi_zmq import native
from tgi_zmq.attention import KVCache
from tgi_zmq.parallel import Shard

DEFAULT_CONTEXT = 4096  # tokens served for a model whose positions set no limit (ALiBi, relative buckets)


@dataclasses.dataclass(frozen=True)
class LaunchRules:
    """What the launcher must know of a checkpoint before any process loads it."""

    context: int  # the longest sequence the model's positions allow
    kv_window: int | None  # every layer's attention window (``ModelConfig.kv_window``)
    decoder_start_token_id: int | None  # encoder-decoder models: the decoder's first token
    eos_token_ids: tuple[int, ...]


class ModelConfig:
    """Base of the architectures' config classes. The launch rules are read from config.json alone:
    the launcher applies them before any process loads the model (a subclass overrides what differs)."""

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """The architecture's config from config.json."""
        raise NotImplementedError

    @classmethod
    def context_length(cls, hf: dict[str, Any]) -> int:
        return hf.get("max_position_embeddings") or DEFAULT_CONTEXT

    @classmethod
    def windows(cls, hf: dict[str, Any]) -> tuple[int | None, ...]:
        """Each layer's attention window (None: the layer sees the whole context); () where none has one."""
        return ()

    @classmethod
    def kv_window(cls, hf: dict[str, Any]) -> int | None:
        """The window of every layer (the largest), None where some layer sees the whole context: the
        scheduler frees the KV pages behind it (``tgi_zmq.block_manager``)."""
        windows = cls.windows(hf)
        return max(windows) if windows and all(windows) else None

    @classmethod
    def decoder_start(cls, hf: dict[str, Any]) -> int | None:
        """The decoder's first token of an encoder-decoder model; None for a decoder-only one."""
        return None


def layer_windows(hf: dict[str, Any], window: int | None) -> tuple[int | None, ...]:
    """Each layer's attention window: config.json's ``layer_types`` ("sliding_attention" layers get the
    window) where it has them, else ``window`` for every layer."""
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention"] * layers
    return tuple(window if kind == "sliding_attention" else None for kind in types)


class PagedModel:
    """A model whose ``cfg`` has ``num_layers`` (layers with KV pages) and ``head_dim``; a subclass
    sets ``num_kv_heads``, the KV heads of this rank."""

    num_kv_heads: int
    # Its forward is batch-invariant under native.INVARIANT (kernels that compute each row alike, and
    # no op that mixes rows); the others (position biases, torch's norms) are not, and say so.
    batch_invariant = False

    def __init__(self, cfg: Any, dtype: torch.dtype, device: torch.device, shard: Shard):
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.shard = shard
        self.kv_dtype = dtype  # the KV cache's (``--kv-cache-dtype``)

    def new_cache(self, num_blocks: int, block_size: int) -> KVCache:
        c = self.cfg
        return KVCache(
            c.num_layers, num_blocks, block_size, self.num_kv_heads, c.head_dim, self.kv_dtype, self.device
        )

    def invariant_steps(self) -> bool:
        """This model's steps are batch-invariant: asked for (``native.INVARIANT``), the extension loaded,
        a forward made of row-wise kernels, on the CPU, over float32 or bfloat16 pages (which the
        in-place attention kernel reads)."""
        floats = (torch.float32, torch.bfloat16)
        return (
            self.batch_invariant
            and native.invariant()
            and torch.device(self.device).type == "cpu"
            and self.dtype in floats
            and self.kv_dtype in floats
        )
