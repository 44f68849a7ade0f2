"""The threads and CPU affinity rule of the pipeline processes (``tgi_zmq.cpus``)."""

from __future__ import annotations

import os

from tgi_zmq.cpus import Placement, apply, placement

PIPELINE = ("frontend", "tokenizer", "scheduler", "detokenizer")


def test_few_cores_pin_nothing_and_give_the_ranks_every_core():
    for process in PIPELINE:
        assert placement(process, [0, 1], 1) == Placement(1, None)
    assert placement("worker-0", [0, 1], 1) == Placement(2, None)
    assert placement("worker-1", [0, 1, 2, 3], 2) == Placement(2, None)  # 4 < 2 * 2 + 2
    assert placement("worker-0", [0, 1], 1, torch_threads=1) == Placement(1, None)


def test_enough_cores_keep_two_for_the_pipeline_and_pin_each_rank_apart():
    cores = list(range(10))
    assert all(placement(p, cores, 2).cores == {0, 1} for p in PIPELINE)
    assert placement("worker-0", cores, 2) == Placement(4, frozenset({2, 3, 4, 5}))
    assert placement("worker-1", cores, 2) == Placement(4, frozenset({6, 7, 8, 9}))
    assert placement("worker-0", [4, 5, 6, 7], 1) == Placement(2, frozenset({6, 7}))


def test_apply_pins_this_process_and_sets_its_threads(monkeypatch):
    import torch

    pinned: list = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append(cores))
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    threads = torch.get_num_threads()
    try:
        assert apply("scheduler", range(1)) == Placement(1, frozenset({0, 1}))
        assert pinned == [frozenset({0, 1})] and torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"
        # --nnodes: rank 3 of a node running ranks 2 and 3 is placed as that node's second rank
        assert apply("worker-3", range(2, 4)) == placement("worker-1", [0, 1, 2, 3, 4, 5], 2)
    finally:
        torch.set_num_threads(threads)
