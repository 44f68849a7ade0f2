"""Liveness from heartbeats (pure, with a fake clock)."""

from tgi_zmq.config import HUNG_AFTER_S
from tgi_zmq.frontend.health import Health
from tgi_zmq.messages import Heartbeat


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_closed_connection_makes_health_wait_for_every_heartbeat():
    clock = Clock()
    health = Health(("tokenizer", "scheduler"), clock=clock)
    for name in health.expected:
        health.observe(Heartbeat(name, "b1", 1, True))
    assert health.healthy()
    clock.now += 0.1
    health.peer_lost()  # the scheduler died: its last heartbeat is still fresh
    assert not health.healthy()
    clock.now += 0.4
    health.observe(Heartbeat("tokenizer", "b1", 1, True))
    assert not health.healthy()  # the scheduler has not beaten since
    assert health.observe(Heartbeat("scheduler", "b2", 2, False)) == "scheduler"  # its replacement
    assert not health.healthy()  # not ready yet
    health.observe(Heartbeat("scheduler", "b2", 2, True))
    assert health.healthy()


def test_silence_is_unhealthy_after_the_timeout():
    clock = Clock()
    health = Health(("worker-0",), clock=clock, timeout=3.0)
    health.observe(Heartbeat("worker-0", "b1", 1, True))
    clock.now += 2.9
    assert health.healthy() and health.newly_silent() == []
    clock.now += 0.2
    assert not health.healthy() and health.newly_silent() == ["worker-0"]
    assert health.newly_silent() == []  # reported once


def test_a_process_silent_for_long_is_reported_hung_once():
    clock = Clock()
    health = Health(("scheduler", "tokenizer"), clock=clock)
    health.observe(Heartbeat("scheduler", "b1", 41, True))
    health.observe(Heartbeat("tokenizer", "b1", 42, True))
    clock.now += HUNG_AFTER_S - 1
    health.observe(Heartbeat("tokenizer", "b1", 42, True))
    assert health.hung() == []
    clock.now += 2
    assert [(name, process.pid) for name, process in health.hung()] == [("scheduler", 41)]
    assert health.hung() == []  # its replacement will beat with a new boot id
