"""A learnt pid is killed only while it still names the process learnt (``tgi_zmq.pids``)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from tgi_zmq.frontend.health import Health
from tgi_zmq.messages import Heartbeat
from tgi_zmq.pids import ProcessHandle, start_time


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_the_start_time_is_the_processes_own() -> None:
    mine = start_time(os.getpid())
    assert mine is not None and mine > 0
    with open("/proc/self/stat") as stat:  # field 22, counted the plain way (no space in our name)
        assert int(stat.read().split()[21]) == start_time(os.getpid()) == mine


def test_a_learnt_process_is_killed() -> None:
    process = sleeper()
    handle = ProcessHandle.learn(process.pid)
    assert handle.kill()
    assert process.wait(timeout=10) == -9


def test_a_process_that_exited_is_not_killed() -> None:
    process = sleeper()
    handle = ProcessHandle.learn(process.pid)
    process.kill()
    process.wait(timeout=10)  # reaped: the pid names nothing now
    assert start_time(process.pid) is None
    assert not handle.kill()
    assert not ProcessHandle.learn(process.pid).kill()  # learnt gone: never killed


def test_a_pid_that_names_another_process_is_not_killed() -> None:
    process = sleeper()
    try:
        handle = ProcessHandle.learn(process.pid)
        reused = dataclasses.replace(handle, started=handle.started - 1)  # as if learnt before reuse
        assert not reused.kill()
        assert process.poll() is None  # still running
    finally:
        process.kill()
        process.wait(timeout=10)


def test_health_hands_out_the_handle_learnt_at_the_first_heartbeat() -> None:
    process = sleeper()
    try:
        health = Health(("tokenizer",), clock=lambda: 0.0)
        health.observe(Heartbeat("tokenizer", "b1", process.pid, True))
        first = health._peers["tokenizer"].process
        health.observe(Heartbeat("tokenizer", "b1", process.pid, True))
        assert health._peers["tokenizer"].process is first  # not read again at each heartbeat
        assert first == ProcessHandle(process.pid, start_time(process.pid))
    finally:
        process.kill()
        process.wait(timeout=10)


def test_a_worker_group_restart_kills_only_the_ranks_still_up(tmp_path) -> None:
    from tgi_zmq import messages as m
    from tgi_zmq.config import ServerConfig
    from tgi_zmq.worker_group import WorkerGroup

    limits = dict(max_batch_prefill_tokens=64, max_concurrent_requests=4, max_total_tokens=128)
    config = ServerConfig("none", "m", str(tmp_path), num_shard=3, **limits)
    group = WorkerGroup(config, sock=None)
    alive, exited, reused = sleeper(), sleeper(), sleeper()
    try:
        for rank, process in enumerate((alive, exited, reused)):
            group.booting(m.WorkerBooting(rank, f"b{rank}", process.pid))
            group.loaded(m.WorkerReady(rank, f"b{rank}", process.pid, config.num_blocks))
        exited.kill()
        exited.wait(timeout=10)
        group.processes[2] = dataclasses.replace(group.processes[2], started=group.processes[2].started - 1)
        group.restart()
        assert alive.wait(timeout=10) == -9
        assert reused.poll() is None  # its pid names a process that started after the one learnt
    finally:
        group.close()
        for process in (alive, exited, reused):
            process.kill()
            process.wait(timeout=10)
