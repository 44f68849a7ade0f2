"""Tensor parallelism: which slice of each weight a rank holds, and the collectives between ranks.

Megatron's split, as TGI and vLLM do it: q/k/v and gate/up are split by output rows (heads,
intermediate units), o and down by input columns, their partial outputs summed with one
all-reduce; the embedding and the LM head are split by vocabulary rows (the embedding's partial
lookups all-reduced, the LM head's logits gathered on rank 0, which samples). Splits may be
uneven (SmolLM2 has 3 KV heads for 2 ranks): each rank takes a contiguous range.

The layers that hold these slices and call the collectives are in ``tgi_zmq.layers``. With one
rank every collective is a no-op and nothing of ``torch.distributed`` is touched.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from tgi_zmq.block_manager import ceil_div

COLLECTIVE_TIMEOUT = timedelta(seconds=10)  # a dead or hung rank fails the others' step in seconds


@dataclasses.dataclass
class Shard:
    rank: int = 0
    world: int = 1
    comm_seconds: float = 0.0  # time spent in collectives, reset by the worker each step

    def split(self, n: int) -> tuple[int, int]:
        """This rank's contiguous range of ``n`` units (the first ``n % world`` ranks get one more)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def part(self, n: int) -> tuple[int, int] | None:
        """``split(n)`` as a weight slice; None (read the whole tensor) with a single rank."""
        return self.split(n) if self.world > 1 else None

    def rows(self, units: tuple[int, int], width: int) -> tuple[int, int] | None:
        """Weight rows of the ``units`` (e.g. heads) this rank holds, ``width`` rows each; None (the
        whole tensor) with a single rank."""
        return (units[0] * width, units[1] * width) if self.world > 1 else None

    def heads(self, num_heads: int, num_kv_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(query head range, KV head range) of this rank; KV heads are replicated when fewer than ranks."""
        group = num_heads // num_kv_heads
        if num_kv_heads >= self.world:
            kv_lo, kv_hi = self.split(num_kv_heads)
            return (kv_lo * group, kv_hi * group), (kv_lo, kv_hi)
        per_kv = self.world // num_kv_heads
        if self.world % num_kv_heads or group % per_kv:
            raise ValueError(
                f"--num-shard {self.world} cannot split {num_heads} heads over {num_kv_heads} KV heads"
            )
        kv = self.rank // per_kv
        part = group // per_kv
        lo = kv * group + (self.rank % per_kv) * part
        return (lo, lo + part), (kv, kv + 1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks, in place."""
        if self.world > 1:
            started = time.perf_counter()
            dist.all_reduce(x)
            self.comm_seconds += time.perf_counter() - started
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Every rank's slice of the vocabulary's logits, concatenated on rank 0 (None elsewhere)."""
        if self.world == 1:
            return logits
        started = time.perf_counter()
        width = ceil_div(vocab_size, self.world)  # gather needs equal shapes: pad to the widest slice
        padded = torch.nn.functional.pad(logits, (0, width - logits.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=0)
        self.comm_seconds += time.perf_counter() - started
        if parts is None:
            return None
        widths = [hi - lo for lo, hi in (Shard(r, self.world).split(vocab_size) for r in range(self.world))]
        return torch.cat([part[..., :w] for part, w in zip(parts, widths, strict=True)], dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank (the sampled tokens, so all ranks fill the same placeholders)."""
        if self.world > 1:
            started = time.perf_counter()
            dist.broadcast(x, src=0)
            self.comm_seconds += time.perf_counter() - started
        return x


def init_group(rank: int, world: int, master_addr: str, master_port: int, device: str) -> Shard:
    """Join the ranks' process group (gloo on CPU, NCCL on CUDA); a no-op for one rank."""
    if world > 1:
        dist.init_process_group(
            backend="nccl" if device.startswith("cuda") else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world,
            timeout=COLLECTIVE_TIMEOUT,
        )
    return Shard(rank, world)
