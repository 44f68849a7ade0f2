"""The error policy of the process loops (``runtime.dispatch``): a request's failure is its own, a broken
invariant stops the process; and the test hook that poisons one request."""

from __future__ import annotations

import logging

import pytest

from tgi_zmq import messages as m
from tgi_zmq import runtime
from tgi_zmq.errors import BrokenInvariant
from tgi_zmq.runtime import dispatch, failure_reporter


def schedule(rid: str, seed: int | None = None) -> m.ScheduleRequest:
    return m.ScheduleRequest(rid, [1, 2], m.SamplingParams(seed=seed), 4, 0.0)


class Outbox:
    """A socket that keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, frame: bytes) -> None:
        self.sent.append(m.decode(frame))


def test_a_request_whose_handler_raises_fails_alone_and_the_loop_goes_on():
    handled, failed = [], []

    def handle(msg: m.ScheduleRequest) -> None:
        if msg.rid == "bad":
            raise KeyError("boom")
        handled.append(msg.rid)

    handlers = {m.ScheduleRequest: handle}
    for rid in ("a", "bad", "b"):
        dispatch(handlers, schedule(rid), lambda rid, exc: failed.append((rid, type(exc))))
    assert handled == ["a", "b"] and failed == [("bad", KeyError)]


def test_a_broken_invariant_or_a_message_of_no_request_stops_the_process():
    def broken(msg) -> None:
        raise BrokenInvariant("the pages are double booked")

    def no_fail(rid: str, exc: Exception) -> None:
        raise AssertionError("not a request's failure")

    with pytest.raises(BrokenInvariant):
        dispatch({m.ScheduleRequest: broken}, schedule("a"), no_fail)
    with pytest.raises(ZeroDivisionError):  # a step result, a heartbeat...: state shared by every request
        dispatch({m.FrontendStarted: lambda msg: 1 / 0}, m.FrontendStarted("boot"), no_fail)


def test_the_reporter_logs_and_sends_the_request_a_500_in_tgi_shape(caplog):
    outbox = Outbox()
    fail = failure_reporter(outbox, "scheduler", logging.getLogger("scheduler"))
    with caplog.at_level(logging.ERROR):
        fail("r1", KeyError("/secret/path.py"))
    (error,) = outbox.sent
    assert error == m.ErrorOutput("r1", "Internal error in the scheduler (KeyError)", "internal", 500)
    assert "rid=r1 failed" in caplog.text and "/secret/path.py" in caplog.text  # the details stay in the log


def test_the_test_hook_poisons_the_chosen_seed_of_the_chosen_message_type(monkeypatch):
    faults = runtime._test_faults("GenerateRequest:7, ScheduleRequest:4343")
    assert faults == {"GenerateRequest": 7, "ScheduleRequest": 4343}
    monkeypatch.setattr(runtime, "_TEST_FAULTS", faults)
    failed = []
    handlers = {m.ScheduleRequest: lambda msg: None}
    for rid, seed in (("a", 7), ("b", 4343), ("c", None)):
        dispatch(handlers, schedule(rid, seed), lambda rid, exc: failed.append(rid))
    assert failed == ["b"]
    assert runtime._test_faults("") == {}
