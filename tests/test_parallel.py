"""Tensor parallelism: slices, head splits, and 2 ranks (gloo, one process each) giving 1 rank's tokens."""

from __future__ import annotations

import queue
import random

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.helpers import ARCHITECTURES, hf_greedy, run_engine
from tgi_zmq.messages import SamplingParams
from tgi_zmq.models import load_model, weight_bytes
from tgi_zmq.parallel import Shard, init_group


def test_split_covers_every_unit_once():
    for n in (1, 5, 9, 49152):
        for world in (1, 2, 3, 4):
            ranges = [Shard(r, world).split(n) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_heads_follow_their_kv_group_or_replicate_it():
    # SmolLM2: 9 query heads over 3 KV heads, 2 ranks: KV heads 2 + 1, query heads 6 + 3.
    assert [Shard(r, 2).heads(9, 3) for r in range(2)] == [((0, 6), (0, 2)), ((6, 9), (2, 3))]
    # One KV head, 2 ranks: both keep it, each takes half of the query heads.
    assert [Shard(r, 2).heads(4, 1) for r in range(2)] == [((0, 2), (0, 1)), ((2, 4), (0, 1))]
    with pytest.raises(ValueError, match="cannot split 3 heads"):
        Shard(0, 2).heads(3, 1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_rank_holds_about_half_of_the_weights(arch, tiny_models):
    folder = tiny_models(arch, vocab_size=4096)
    whole = weight_bytes(load_model(folder, "float32", "cpu"))
    halves = [weight_bytes(load_model(folder, "float32", "cpu", Shard(r, 2))) for r in range(2)]
    print(f"{arch}: whole {whole} bytes, ranks {halves}")
    assert all(0.45 * whole < h < 0.56 * whole for h in halves)


def _rank(rank: int, port: int, tasks, results) -> None:
    """One rank of ``TwoRanks``: run each task's prompts through the engine on two ranks (rank 0 says
    the tokens), until a None task; a failure is reported and ends the rank (its group is unusable)."""
    torch.set_num_threads(1)
    shard = init_group(rank, 2, "127.0.0.1", port, "cpu")
    while (task := tasks.get()) is not None:
        folder, prompts, params = task
        try:
            out, _ = run_engine(
                folder, prompts, params, 8, num_blocks=40, max_step_tokens=16, overlap=True, shard=shard
            )
        except Exception as exc:
            results.put(f"rank {rank}: {exc!r}")
            return
        if rank == 0:
            results.put(out)
    torch.distributed.destroy_process_group()


class TwoRanks:
    """Two rank processes (gloo) started once and given one model after another: spawning a pair per
    architecture cost ~3 s of imports each. A failed task stops the pair; the next task starts anew."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: list = []
        self.tasks: list = []  # a queue per rank

    def run(self, folder, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        if not self.procs or not all(p.is_alive() for p in self.procs):
            self.start()
        for tasks in self.tasks:
            tasks.put((folder, prompts, params))
        try:
            out = self.results.get(timeout=120)
        except queue.Empty:
            out = "no answer in 120 s"
        if isinstance(out, str):
            self.stop()
            pytest.fail(out)
        return out

    def start(self) -> None:
        self.stop()
        self.tasks = [self.ctx.Queue() for _ in range(2)]
        self.results = self.ctx.Queue()
        port = free_port()
        self.procs = [
            self.ctx.Process(target=_rank, args=(r, port, self.tasks[r], self.results), daemon=True)
            for r in range(2)
        ]
        for p in self.procs:
            p.start()

    def stop(self) -> None:
        for p, tasks in zip(self.procs, self.tasks, strict=True):
            if p.is_alive():
                tasks.put(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        self.procs, self.tasks = [], []


@pytest.fixture(scope="module")
def two_ranks():
    pair = TwoRanks()
    yield pair
    pair.stop()


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "llama-biases"])
def test_two_ranks_give_the_tokens_of_one(arch, tiny_models, two_ranks):
    # llama-biases: Llama with attention and MLP biases (the row-parallel ones live on rank 0 only)
    biases = dict(attention_bias=True, mlp_bias=True) if arch == "llama-biases" else {}
    folder = tiny_models(arch.removesuffix("-biases"), **biases)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(2, 30))] for _ in range(5)]
    params = [SamplingParams()] * 3 + [SamplingParams(do_sample=True, seed=s) for s in range(2)]
    sharded = two_ranks.run(folder, prompts, params)
    single, _ = run_engine(folder, prompts, params, 8, num_blocks=40, max_step_tokens=16, overlap=True)
    assert sharded == single
    assert sharded[:3] == [hf_greedy(folder, p, 8) for p in prompts[:3]]


def test_one_shard_never_touches_torch_distributed(tiny_models):
    from tgi_zmq.model_runner import ModelRunner

    runner = ModelRunner(str(tiny_models("llama")), "float32", "cpu", 8, 4)
    assert runner.shard.world == 1 and not torch.distributed.is_initialized()
