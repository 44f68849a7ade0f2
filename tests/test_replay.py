"""The frontend's replay after a fault (pure: the pipeline's dispatch, no sockets)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

from tgi_zmq import messages as m
from tgi_zmq.config import ServerConfig
from tgi_zmq.errors import RequestError
from tgi_zmq.frontend.health import Health
from tgi_zmq.frontend.jobs import submit
from tgi_zmq.frontend.pipeline import MAX_REPLAYS, Pipeline


@pytest.fixture
def pipeline() -> Iterator[Pipeline]:
    with tempfile.TemporaryDirectory(prefix="tgizmq-r") as path:
        config = ServerConfig(model_id="none", served_model_names=("m",), runtime_dir=path)
        yield Pipeline(config, Health(("tokenizer", "scheduler", "detokenizer", "worker-0")))


def sent(pipeline: Pipeline) -> list:
    out = []
    while not pipeline._outbox.empty():
        out.append(m.decode(pipeline._outbox.get_nowait()))
    return out


def delta(rid: str, token: int, finish: str | None = None) -> m.BatchTextOutput:
    return m.BatchTextOutput([m.RequestDelta(rid, [token], ["x"], [0.0], [False], "x", finish, 0, 7)])


def beat(process: str, boot: str) -> m.Heartbeat:
    return m.Heartbeat(process, boot, 1, True)


def request(rid: str) -> m.GenerateRequest:
    return m.GenerateRequest(rid, "hi", None, m.SamplingParams(seed=3), 5, 0.0)


async def test_a_restarted_scheduler_gets_the_request_again_with_its_tokens(pipeline):
    with submit(pipeline, [request("a")], route="/generate") as group:
        pipeline._dispatch(beat("scheduler", "boot-1"))
        pipeline._dispatch(m.PromptIdsOutput("a", [1, 2, 3]))
        pipeline._dispatch(delta("a", 10))
        pipeline._dispatch(delta("a", 11))
        assert [type(msg).__name__ for msg in sent(pipeline)] == ["GenerateRequest"]

        pipeline._dispatch(beat("worker-0", "w2"))  # a worker is the scheduler's business: no replay
        pipeline._dispatch(beat("worker-0", "w3"))
        assert sent(pipeline) == []
        pipeline._dispatch(beat("scheduler", "boot-2"))
        abort, replay = sent(pipeline)
        assert abort == m.AbortRequest("a")
        assert (replay.rid, replay.prompt_ids, replay.output_ids, replay.params.seed) == (
            "a~1",
            [1, 2, 3],
            [10, 11],
            3,
        )

        pipeline._dispatch(delta("a", 99))  # the old attempt's late token: dropped
        pipeline._dispatch(delta("a~1", 12))
        pipeline._dispatch(delta("a~1", 13, "length"))
        await group.collect()
    (job,) = group.jobs
    assert job.token_ids == [10, 11, 12, 13] and job.finish_reason == "length"
    assert sent(pipeline) == []  # it ended: nothing to abort
    metrics = pipeline.metrics.render().decode()
    assert "tgi_request_replays_total 1.0" in metrics
    assert 'tgi_process_restarts_total{process="scheduler"} 1.0' in metrics
    assert 'tgi_process_restarts_total{process="worker-0"} 1.0' in metrics  # its first beat is no restart


async def test_a_request_replayed_too_often_fails_with_a_424(pipeline):
    with submit(pipeline, [request("a")], route="/generate") as group:
        for boot in range(MAX_REPLAYS + 2):
            pipeline._dispatch(beat("detokenizer", f"boot-{boot}"))
        with pytest.raises(RequestError) as failure:
            await group.collect()
    assert failure.value.status == 424 and "failed 4 times" in failure.value.error
    assert sent(pipeline)[-1] == m.AbortRequest(f"a~{MAX_REPLAYS}")


async def test_a_pipeline_that_does_not_heal_fails_its_requests_with_a_503(pipeline):
    with submit(pipeline, [request("a")], route="/generate") as group:
        pipeline.fail_stuck(61.0)
        with pytest.raises(RequestError) as failure:
            await group.collect()
    assert (failure.value.status, failure.value.error_type) == (503, "unavailable")


async def test_an_output_whose_handler_raises_fails_its_request_alone(pipeline):
    """Each request of a ``BatchTextOutput`` is handled apart: one that raises gets a 500 and is
    aborted down the pipeline; the others get their tokens."""
    with (
        submit(pipeline, [request("a")], route="/generate") as bad,
        submit(pipeline, [request("b")], route="/generate") as good,
    ):
        sent(pipeline)
        broken = m.RequestDelta("a", None, [], [], [], "", None, 0, 7)  # its handler raises
        pipeline._dispatch(m.BatchTextOutput([broken, *delta("b", 10).deltas]))
        with pytest.raises(RequestError) as failure:
            await bad.collect()
        assert (failure.value.status, failure.value.error_type) == (500, "internal")
        assert failure.value.error == "Internal error in the frontend (TypeError)"
        assert sent(pipeline) == [m.AbortRequest("a")]
        pipeline._dispatch(delta("b", 11, "length"))
        await good.collect()
    assert good.jobs[0].token_ids == [10, 11]


async def test_an_error_from_the_pipeline_aborts_its_request_everywhere(pipeline):
    with submit(pipeline, [request("a")], route="/generate") as group:
        sent(pipeline)
        pipeline._dispatch(m.ErrorOutput("a", "Internal error in the scheduler (KeyError)", "internal", 500))
        with pytest.raises(RequestError) as failure:
            await group.collect()
    assert failure.value.status == 500
    assert sent(pipeline) == [m.AbortRequest("a")]  # the scheduler or the detokenizer may still hold it


def test_a_failure_outside_any_request_is_a_broken_invariant(pipeline, monkeypatch):
    """Not a request's failure: ``_dispatch`` raises, and the reader exits the frontend."""

    def broken(msg):
        raise RuntimeError("health state is wrong")

    monkeypatch.setattr(pipeline.health, "observe", broken)
    with pytest.raises(RuntimeError):
        pipeline._dispatch(beat("scheduler", "boot-1"))
