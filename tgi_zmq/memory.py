"""How many KV-cache tokens fit: sizing the page pool from a memory budget, as TGI and vLLM do.

Without ``--max-batch-total-tokens`` the pool gets a fraction of the memory that is free once
the weights are in: available RAM on CPU (the KV tensors are mapped lazily, so untouched pages
cost nothing), free device memory on GPU.

With ``--num-shard N`` each rank holds its own slice of the weights and its own KV heads (a KV
head is replicated on several ranks when there are fewer KV heads than ranks, ``Shard.heads``),
and every rank has a page for every token of the pool. So the pool is sized rank by rank: a GPU
rank has its own device (``cuda:<rank>``, as the worker picks it) and holds what that device has
left after its slice of the weights; CPU ranks share the RAM, so their weights and their KV bytes
per token add up. The pool is the smallest of these, so that it fits on every rank.

A rank's weights are counted by building its slice of the model on the ``meta`` device from the
safetensors headers (no tensor data is read): the count follows the model's own sharding, and each
tensor counts at the dtype it is loaded in. The launcher decides before any process starts, and
every process reads the same limits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
from pathlib import Path

import torch

from tgi_zmq.block_manager import ceil_div
from tgi_zmq.dtypes import DTYPES, to_torch
from tgi_zmq.parallel import Shard

log = logging.getLogger(__name__)

ACTIVATION_RESERVE = 1 << 30  # bytes each rank keeps for activations, logits and the runtime
BY_SAFETENSORS = {d.safetensors: name for name, d in DTYPES.items()}  # header code -> dtype name


@dataclasses.dataclass(frozen=True)
class RankMemory:
    """What one rank holds besides its activations."""

    rank: int
    device: str  # "cpu" or "cuda:<rank>"
    weights: int  # bytes of this rank's slice of the weights
    kv_per_token: int  # bytes of this rank's K and V for one token, over all layers


def cache_geometry(hf: dict) -> tuple[int, int, int, int]:
    """(layers with KV pages, query heads, KV heads, head dim), read by the architecture's config class.

    T5's pages hold the decoder layers' self-attention and, in other pages, their cross-attention K/V.
    """
    from tgi_zmq.models import architecture

    cfg = architecture(hf)[0].from_hf(hf)
    return cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim


def kv_bytes_per_token(hf_config: dict, dtype: str, shard: Shard | None = None) -> int:
    """K and V of one token over all layers, for the KV heads of ``shard``'s rank (all of them by default)."""
    layers, heads, kv_heads, head_dim = cache_geometry(hf_config)
    lo, hi = (shard or Shard()).heads(heads, kv_heads)[1]
    return 2 * layers * (hi - lo) * head_dim * DTYPES[dtype].size


def read_header(path: Path) -> dict[str, dict]:
    """The tensors of one safetensors file: name -> {"dtype", "shape", "data_offsets"}."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def tensor_bytes(info: dict, dtype: str | None) -> int:
    """Bytes of one header entry once loaded: a floating-point tensor cast to ``dtype`` (None: not cast),
    any other (integers, bool: quantized or index tensors) at its own element size."""
    stored = BY_SAFETENSORS.get(info["dtype"])
    if stored is None:
        raise ValueError(f"unknown safetensors dtype {info['dtype']!r}")
    cast = dtype is not None and to_torch(stored).is_floating_point
    size = DTYPES[dtype if cast else stored].size
    numel = 1
    for dim in info["shape"]:
        numel *= dim
    return numel * size


def weights_bytes(model_dir: Path, dtype: str | None) -> int:
    """Bytes of every tensor of the checkpoint as one rank holding them all loads it (``tensor_bytes``)."""
    return sum(
        tensor_bytes(info, dtype)
        for path in Path(model_dir).glob("*.safetensors")
        for info in read_header(path).values()
    )


class _MetaCheckpoint:
    """Stands in for a ``safe_open`` handle: meta tensors of the header's shapes and dtypes."""

    def __init__(self, path: Path):
        self.header = read_header(path)

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        return torch.empty(info["shape"], dtype=to_torch(BY_SAFETENSORS[info["dtype"]]), device="meta")

    get_slice = get_tensor  # a meta tensor slices as safetensors' slice does: part[rows] or part[rows, cols]


def rank_weights_bytes(model_dir: Path, dtype: str, shard: Shard) -> int:
    """Bytes of the weights ``shard``'s rank loads: its slice of the model built on the meta device.

    Falls back to an even split of ``weights_bytes`` (with a warning) if the model cannot be built there.
    A GGUF file's ranks hold an even split of its blocks (repacked at about their size).
    """
    from tgi_zmq.checkpoint.gguf_file import is_gguf_folder
    from tgi_zmq.checkpoint.safetensors import SafetensorsWeights
    from tgi_zmq.models import architecture, read_config

    gguf = is_gguf_folder(model_dir)
    if gguf is not None:
        return ceil_div(gguf.stat().st_size, shard.world)

    class Counted(SafetensorsWeights):
        """The checkpoint's tensors as meta tensors, each one the model asks for counted."""

        nbytes = 0

        def get(self, name, *args, **kwargs) -> torch.Tensor:
            tensor = super().get(name, *args, **kwargs)
            self.nbytes += tensor.numel() * tensor.element_size()
            return tensor

        def _report_progress(self) -> None:  # nothing is loaded: no progress lines
            pass

    meta = torch.device("meta")
    try:
        hf = read_config(model_dir)
        config_cls, model_cls = architecture(hf)
        weights = Counted(model_dir, to_torch(dtype), meta)
        weights._handles = {path: _MetaCheckpoint(path) for path in set(weights.files.values())}
        model_cls(config_cls.from_hf(hf), weights, to_torch(dtype), meta, shard)
        if weights.nbytes == 0:
            raise RuntimeError("the model read no tensor through its WeightSource")
        return weights.nbytes
    except Exception as exc:  # sizing must not stop a launch: estimate instead
        estimate = ceil_div(weights_bytes(model_dir, dtype), shard.world)
        log.warning(
            "could not size rank %d's weights on the meta device (%s); assuming 1/%d of them: %d bytes",
            shard.rank,
            exc,
            shard.world,
            estimate,
        )
        return estimate


def rank_device(device: str, rank: int) -> str:
    """The device of ``rank``: one GPU per rank, as the worker chooses it; CPU ranks share the host."""
    return f"cuda:{rank}" if device.startswith("cuda") else device


def rank_memory(
    model_dir: Path,
    hf_config: dict,
    dtype: str,
    device: str,
    num_shard: int,
    kv_dtype: str | None = None,
    here: range | None = None,
) -> list[RankMemory]:
    """What each of the ``num_shard`` ranks on this host (``here``, by default all; ``--nnodes``: node
    0's) holds; refuses more GPU ranks than GPUs."""
    here = here if here is not None else range(num_shard)
    if device.startswith("cuda") and len(here) > torch.cuda.device_count():
        raise ValueError(
            f"--num-shard {num_shard} needs one GPU per rank ({len(here)} on this host); this machine has "
            f"{torch.cuda.device_count()}"
        )
    ranks = []
    for rank in here:
        shard = Shard(rank, num_shard)
        weights = rank_weights_bytes(model_dir, dtype, shard)
        kv = kv_bytes_per_token(hf_config, kv_dtype or dtype, shard)
        ranks.append(RankMemory(rank, rank_device(device, rank - here.start), weights, kv))
    return ranks


def free_memory(device: str) -> int:
    """Bytes free now: MemAvailable on CPU, free memory of the device on GPU."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def kv_budget_tokens(
    model_dir: Path,
    hf_config: dict,
    dtype: str,
    device: str,
    fraction: float,
    num_shard: int = 1,
    kv_dtype: str | None = None,
    here: range | None = None,
) -> int:
    """Tokens of KV cache that every rank (of those ``here``) holds in ``fraction`` of its memory left
    after its weights.

    Ranks on one device (the CPU) share its memory: their weights, reserves and KV bytes add up.
    """
    by_device: dict[str, list[RankMemory]] = {}
    for rank in rank_memory(model_dir, hf_config, dtype, device, num_shard, kv_dtype, here):
        by_device.setdefault(rank.device, []).append(rank)
    tokens = []
    for dev, ranks in by_device.items():
        left = free_memory(dev) - sum(r.weights for r in ranks) - ACTIVATION_RESERVE * len(ranks)
        tokens.append(max(0, int(left * fraction) // sum(r.kv_per_token for r in ranks)))
    return min(tokens)
