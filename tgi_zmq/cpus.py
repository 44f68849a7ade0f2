"""Threads and CPU affinity of each pipeline process, decided at its start from the cores it may use.

The worker ranks do the heavy work (matmuls, attention); the frontend, tokenizer, scheduler and
detokenizer do a little per token, in bursts. The rule (docs/benchmarks.md, "Processes on few cores"):
- the pipeline processes run one torch thread each: no OpenMP pool of their own to wake or spin;
- few cores (fewer than ``2 * num_shard + PIPELINE_CORES``): nothing is pinned, each rank runs
  ``cores // num_shard`` threads, and the pipeline processes run in the gaps the ranks leave (while a
  rank waits for its next step). Pinning them to a core of their own would leave that core idle
  most of the time, a third or half of a 2-4 core machine;
- more cores: ``PIPELINE_CORES`` cores are kept for the pipeline processes (pinned there) and each rank
  is pinned to its own ``(cores - PIPELINE_CORES) // num_shard`` cores with as many threads, so no
  rank's threads are ever descheduled by another process mid-matmul.
``--torch-threads`` overrides a rank's thread count (its pinning stays).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import sys

log = logging.getLogger(__name__)

PIPELINE_CORES = 2


@dataclasses.dataclass(frozen=True)
class Placement:
    threads: int  # torch intra-op threads
    cores: frozenset[int] | None  # the CPUs it is pinned to; None: not pinned


def placement(process: str, cores: list[int], num_shard: int, torch_threads: int = 0) -> Placement:
    """Where ``process`` (``worker-<rank>``, ``scheduler``...) runs, given the service's ``cores``."""
    cores = sorted(cores)
    pinned = len(cores) >= 2 * num_shard + PIPELINE_CORES
    if not process.startswith("worker-"):
        return Placement(1, frozenset(cores[:PIPELINE_CORES]) if pinned else None)
    rank = int(process.removeprefix("worker-"))
    if not pinned:
        return Placement(torch_threads or max(1, len(cores) // num_shard), None)
    per_rank = (len(cores) - PIPELINE_CORES) // num_shard
    mine = cores[PIPELINE_CORES + rank * per_rank : PIPELINE_CORES + (rank + 1) * per_rank]
    return Placement(torch_threads or per_rank, frozenset(mine))


def split(cores: list[int], parts: int) -> list[list[int]]:
    """``cores`` in ``parts`` runs of neighbours, as even as possible (``--replicas``: one each)."""
    if not 1 <= parts <= len(cores):
        raise ValueError(f"{parts} replicas on {len(cores)} cores: at most one replica a core")
    cores = sorted(cores)
    size, extra = divmod(len(cores), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [cores[start:end] for start, end in itertools.pairwise(bounds)]


def service_cores() -> list[int]:
    """The CPUs this process may run on (its affinity: a container's or taskset's limit)."""
    return sorted(os.sched_getaffinity(0))


def apply(process: str, ranks_here: range, torch_threads: int = 0) -> Placement:
    """Pin this process and set its torch threads by the rule (call it first: a process that imports
    torch later reads OMP_NUM_THREADS then); logs the decision once. ``ranks_here``: the ranks on this
    node (``ServerConfig.local_ranks``), where the rule places a worker by its index among them."""
    cores = service_cores()
    num_shard = len(ranks_here)
    if process.startswith("worker-"):
        rank = int(process.removeprefix("worker-"))
        where = placement(f"worker-{rank - ranks_here.start}", cores, num_shard, torch_threads)
    else:
        where = placement(process, cores, num_shard, torch_threads)
    if where.cores is not None:
        os.sched_setaffinity(0, where.cores)
    os.environ["OMP_NUM_THREADS"] = str(where.threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(where.threads)
    log.info(
        "%s: %d torch thread(s), %s (%d cores for %d rank(s))",
        process,
        where.threads,
        f"pinned to CPUs {sorted(where.cores)}" if where.cores is not None else "not pinned",
        len(cores),
        num_shard,
    )
    return where
