"""/metrics: TGI's metric names and values (tgi_zmq.frontend.metrics), without the real service."""

from __future__ import annotations

import asyncio
import re

import pytest
import zmq
import zmq.asyncio
from aiohttp.test_utils import TestClient
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import frontend_config
from tgi_zmq import messages
from tgi_zmq.errors import RequestError
from tgi_zmq.frontend.health import Health
from tgi_zmq.frontend.http import FRONTEND
from tgi_zmq.frontend.jobs import submit
from tgi_zmq.frontend.metrics import DURATION_BUCKETS, Metrics, length_buckets
from tgi_zmq.frontend.pipeline import Pipeline
from tgi_zmq.messages import (
    BatchTextOutput,
    ErrorOutput,
    ForwardTiming,
    GenerateRequest,
    RequestDelta,
    SamplingParams,
    SchedulerStats,
    StageTimes,
)

# name -> TYPE, exactly as exposed (TGI's own counters have no "_total")
EXPOSED = {
    "tgi_request_count": "counter",
    "tgi_request_success": "counter",
    "tgi_request_failure": "counter",
    "tgi_request_duration": "histogram",
    "tgi_request_input_length": "histogram",
    "tgi_request_generated_tokens": "histogram",
    "tgi_request_mean_time_per_token_duration": "histogram",
    "tgi_request_queue_duration": "histogram",
    "tgi_request_stage_duration": "histogram",
    "tgi_batch_forward_duration": "histogram",
    "tgi_queue_size": "gauge",
    "tgi_batch_current_size": "gauge",
    "tgi_batch_max_total_tokens": "gauge",
    "tgi_kv_blocks_used": "gauge",
    "tgi_kv_blocks_total": "gauge",
    "tgi_prefix_cache_hit_tokens_total": "counter",
    "tgi_preemptions_total": "counter",
    # the rest of TGI's names (its Grafana dashboards read them)
    "tgi_request_validation_duration": "histogram",
    "tgi_request_inference_duration": "histogram",
    "tgi_request_max_new_tokens": "histogram",
    "tgi_batch_current_max_tokens": "gauge",
    "tgi_batch_next_size": "histogram",
    "tgi_batch_inference_count": "counter",
    "tgi_batch_inference_duration": "histogram",
    "tgi_batch_decode_duration": "histogram",
    # what routers read from a vLLM engine, under vLLM's names
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:prefix_cache_queries_total": "counter",
    "vllm:prefix_cache_hits_total": "counter",
}


def stats(**overrides) -> SchedulerStats:
    fields = dict(
        queue_size=3,
        batch_size=5,
        kv_blocks_used=40,
        kv_blocks_cached=12,
        kv_blocks_total=4096,
        max_batch_total_tokens=65536,
        prefix_cache_hit_tokens=32,
        prefix_cache_query_tokens=100,
        preemptions=1,
        queue_seconds=[0.01, 0.2],
        forward_seconds=[
            ForwardTiming("prefill", 0.05, 0.01, 0.06, 2),
            ForwardTiming("decode", 0.002, 0.001, 0.004),
            ForwardTiming("decode", 0.003, 0.001, 0.005),
        ],
        generated_tokens=50,
        interval_seconds=0.5,
        batch_max_tokens=900,
    )
    return SchedulerStats(**{**fields, **overrides})


def text(metrics: Metrics) -> str:
    return metrics.render().decode()


def types(exposition: str) -> dict[str, str]:
    """``# TYPE`` lines, by metric name."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))


def samples(exposition: str) -> dict[str, float]:
    """Sample lines by their literal ``name{labels}``."""
    rows = re.findall(r"^([^#\s][^ ]*) (\S+)$", exposition, re.M)
    return {key: float(value) for key, value in rows}


@pytest.fixture
def metrics() -> Metrics:
    lengths = dict(max_input_tokens=4095, max_total_tokens=4096)
    return Metrics(**lengths, model_name="m", block_size=16, num_blocks=4096)


# ---------------------------------------------------------------------------- exposition


def test_every_tgi_name_is_exposed_exactly(metrics: Metrics) -> None:
    metrics.failed("validation")
    exposed = types(text(metrics))
    for name, kind in EXPOSED.items():
        assert exposed.get(name) == kind, name
    for bare in ("tgi_request_count", "tgi_request_success", "tgi_request_failure"):
        assert f"{bare}_total" not in text(metrics)


def test_exposition_parses_with_prometheus_client(metrics: Metrics) -> None:
    metrics.observe_scheduler(stats())
    families = {f.name: f for f in text_string_to_metric_families(text(metrics))}
    for name, kind in EXPOSED.items():
        family = name.removesuffix("_total") if kind == "counter" else name  # as the parser names them
        assert families[family].type == kind, name


def test_gauges_read_zero_before_the_first_stats(metrics: Metrics) -> None:
    values = samples(text(metrics))
    for name in ("tgi_queue_size", "tgi_batch_current_size", "tgi_batch_max_total_tokens"):
        assert values[name] == 0
    assert values["tgi_kv_blocks_used"] == values["tgi_kv_blocks_total"] == 0
    assert values["tgi_request_count"] == values["tgi_request_success"] == 0
    assert values['tgi_batch_forward_duration_count{method="decode"}'] == 0


def test_bucket_bounds_follow_tgi(metrics: Metrics) -> None:
    assert len(DURATION_BUCKETS) == 35
    assert DURATION_BUCKETS[0] == pytest.approx(0.00015)
    assert DURATION_BUCKETS[1] / DURATION_BUCKETS[0] == pytest.approx(1.5)
    assert length_buckets(4095)[0] == pytest.approx(40.95)
    assert length_buckets(4095)[-1] == pytest.approx(4095)
    values = samples(text(metrics))
    assert 'tgi_request_duration_bucket{le="0.00015000000000000001"}' in values  # as TGI writes it
    for name, top in (("tgi_request_input_length", 4095), ("tgi_request_generated_tokens", 4096)):
        bounds = re.findall(rf'^{name}_bucket{{le="([^"]+)"}}', text(metrics), re.M)
        assert len(bounds) == 101 and bounds[-1] == "+Inf"
        assert float(bounds[0]) == pytest.approx(top / 100)
        assert float(bounds[-2]) == pytest.approx(top)


# ---------------------------------------------------------------------------- scheduler stats


def test_scheduler_stats_set_gauges_and_add_deltas(metrics: Metrics) -> None:
    metrics.observe_scheduler(stats())
    metrics.observe_scheduler(stats(queue_size=0, prefix_cache_hit_tokens=8, preemptions=0, queue_seconds=[]))
    values = samples(text(metrics))
    assert values["tgi_queue_size"] == 0
    assert values["tgi_batch_current_size"] == 5
    assert values["tgi_batch_max_total_tokens"] == 65536
    assert values["tgi_kv_blocks_used"] == 40
    assert values["tgi_kv_blocks_total"] == 4096
    assert values["tgi_prefix_cache_hit_tokens_total"] == 40
    assert values["tgi_preemptions_total"] == 1
    assert values["tgi_request_queue_duration_count"] == 2
    assert values["tgi_request_queue_duration_sum"] == pytest.approx(0.21)
    assert values['tgi_batch_forward_duration_count{method="prefill"}'] == 2
    assert values['tgi_batch_forward_duration_count{method="decode"}'] == 4
    assert values['tgi_batch_forward_duration_sum{method="decode"}'] == pytest.approx(0.01)
    assert values['tgi_batch_inference_count{method="decode"}'] == 4
    assert values['tgi_batch_inference_duration_sum{method="decode"}'] == pytest.approx(0.018)
    assert values["tgi_batch_next_size_count"] == 2 and values["tgi_batch_next_size_sum"] == 4
    assert values["tgi_batch_current_max_tokens"] == 900
    assert values['tgi_batch_decode_duration_sum{method="decode"}'] == pytest.approx(0.004)


def test_a_requests_stage_times_fill_tgis_validation_and_inference_histograms(metrics: Metrics) -> None:
    metrics.observe_stages(StageTimes(tokenize=0.01, queue=0.2, prefill=0.3, decode=1.0, detokenize=0.05))
    values = samples(text(metrics))
    assert values["tgi_request_validation_duration_sum"] == pytest.approx(0.01)
    assert values["tgi_request_inference_duration_sum"] == pytest.approx(1.3)  # first step -> last token


def test_vllm_names_carry_the_model_name_and_count_cached_blocks_as_free(metrics: Metrics) -> None:
    """What llm-d and SMG read; the KV usage counts blocks held only by the prefix cache as free."""
    metrics.observe_scheduler(stats(kv_blocks_used=40, kv_blocks_cached=12, kv_blocks_total=4096))
    metrics.observe_scheduler(stats(prefix_cache_hit_tokens=8, prefix_cache_query_tokens=20))
    values = samples(text(metrics))
    assert values['vllm:num_requests_waiting{model_name="m"}'] == 3
    assert values['vllm:num_requests_running{model_name="m"}'] == 5
    assert values['vllm:kv_cache_usage_perc{model_name="m"}'] == pytest.approx(28 / 4096)
    assert values['vllm:cache_config_info{block_size="16",model_name="m",num_gpu_blocks="4096"}'] == 1
    assert values['vllm:prefix_cache_queries_total{model_name="m"}'] == 120
    assert values['vllm:prefix_cache_hits_total{model_name="m"}'] == 40
    metrics.observe_scheduler(stats(kv_blocks_used=95, kv_blocks_cached=95, kv_blocks_total=100))
    assert samples(text(metrics))['vllm:kv_cache_usage_perc{model_name="m"}'] == 0  # all reusable


def test_the_load_row_smg_polls_has_its_types_and_the_schedulers_figures(metrics: Metrics) -> None:
    """GET /v1/loads as SGLang serves it (SMG reads its integers as i32: they must be JSON integers)."""
    idle = metrics.load(max_running_requests=128)
    assert idle["num_running_reqs"] == idle["num_used_tokens"] == 0 and idle["max_total_num_tokens"] == 65536
    metrics.observe_scheduler(stats(kv_blocks_used=40, kv_blocks_cached=12))
    metrics.observe_scheduler(stats(prefix_cache_hit_tokens=8, prefix_cache_query_tokens=20))
    row = metrics.load(max_running_requests=128)
    assert row == {
        "dp_rank": 0,
        "num_running_reqs": 5,
        "num_waiting_reqs": 3,
        "num_total_reqs": 8,
        "num_used_tokens": 28 * 16,
        "max_total_num_tokens": 4096 * 16,
        "token_usage": pytest.approx(28 / 4096),
        "gen_throughput": pytest.approx(100.0),
        "cache_hit_rate": pytest.approx(40 / 120),
        "utilization": pytest.approx(28 / 4096),
        "max_running_requests": 128,
    }
    floats = {"token_usage", "gen_throughput", "cache_hit_rate", "utilization"}
    assert all(isinstance(v, float if k in floats else int) for k, v in row.items()), row


# ---------------------------------------------------------------------------- request outcomes


def test_failures_escaping_a_handler_are_counted_by_error_type(metrics: Metrics) -> None:
    for exc in (
        RequestError("bad", error_type="validation"),
        RequestError("busy", error_type="overloaded", status=429),
        asyncio.CancelledError(),
        ConnectionResetError(),
    ):
        with pytest.raises(type(exc)), metrics.request():
            raise exc
    with metrics.request():
        metrics.succeeded()
    values = samples(text(metrics))
    assert values["tgi_request_count"] == 5
    assert values["tgi_request_success"] == 1
    assert values['tgi_request_failure{err="validation"}'] == 1
    assert values['tgi_request_failure{err="overloaded"}'] == 1
    assert values['tgi_request_failure{err="dropped"}'] == 2


def test_a_finished_generation_fills_the_histograms(metrics: Metrics) -> None:
    first = dict(seconds=1.5, prompt_tokens=12, generated_tokens=11, decode_seconds=1.0)
    metrics.generation_finished(**first, max_new_tokens=20)
    metrics.generation_finished(
        seconds=0.2, prompt_tokens=3, generated_tokens=1, decode_seconds=0.0, max_new_tokens=None
    )
    values = samples(text(metrics))
    assert values["tgi_request_max_new_tokens_sum"] == 20 + 4096 - 3  # none asked: up to max_total_tokens
    assert values["tgi_request_duration_count"] == 2
    assert values["tgi_request_duration_sum"] == pytest.approx(1.7)
    assert values["tgi_request_input_length_sum"] == 15
    assert values["tgi_request_generated_tokens_sum"] == 12
    assert values["tgi_request_mean_time_per_token_duration_count"] == 1  # one token: no inter-token time
    assert values["tgi_request_mean_time_per_token_duration_sum"] == pytest.approx(0.1)


# ---------------------------------------------------------------------------- jobs.submit


def request(rid: str) -> GenerateRequest:
    return GenerateRequest(rid, "hi", None, SamplingParams(), 3, 0.0)


def delta(rid: str, n: int, finish: str | None) -> RequestDelta:
    return RequestDelta(rid, [n], ["x"], [0.0], [False], "x", finish, n, 7)


async def test_submit_counts_success_and_observes_the_generation(runtime_dir: str) -> None:
    pipeline = Pipeline(frontend_config(runtime_dir), Health(()))
    with submit(pipeline, [request("a")], route="/generate") as group:
        for n, finish in ((1, None), (2, None), (3, "length")):
            pipeline._dispatch(BatchTextOutput([delta("a", n, finish)]))
        await group.collect()
    values = samples(text(pipeline.metrics))
    assert values["tgi_request_success"] == 1
    assert values["tgi_request_duration_count"] == 1
    assert values["tgi_request_input_length_sum"] == 7
    assert values["tgi_request_generated_tokens_sum"] == 3
    assert values["tgi_request_mean_time_per_token_duration_count"] == 1


async def test_the_last_delta_s_stage_times_fill_the_stage_histogram(runtime_dir: str) -> None:
    pipeline = Pipeline(frontend_config(runtime_dir), Health(()))
    assert samples(text(pipeline.metrics))['tgi_request_stage_duration_count{stage="detokenize"}'] == 0
    last = delta("a", 1, "length")
    last.stages = StageTimes(tokenize=0.001, queue=0.02, prefill=0.3, decode=4.0, detokenize=0.005)
    with submit(pipeline, [request("a")], route="/generate") as group:
        pipeline._dispatch(BatchTextOutput([last]))
        await group.collect()
    values = samples(text(pipeline.metrics))
    for stage, seconds in (("tokenize", 0.001), ("queue", 0.02), ("prefill", 0.3), ("decode", 4.0)):
        assert values[f'tgi_request_stage_duration_count{{stage="{stage}"}}'] == 1
        assert values[f'tgi_request_stage_duration_sum{{stage="{stage}"}}'] == pytest.approx(seconds)
    assert values["tgi_request_queue_duration_count"] == 0  # TGI's own comes from the scheduler's stats


async def test_submit_counts_an_in_stream_error_and_a_client_gone(runtime_dir: str) -> None:
    pipeline = Pipeline(frontend_config(runtime_dir), Health(()))
    with submit(pipeline, [request("a")], route="/generate_stream") as group:
        pipeline._dispatch(ErrorOutput("a", "boom", "generation", 424))
        with pytest.raises(RequestError):  # stream_group turns it into an error event
            await group.next()
    with submit(pipeline, [request("b")], route="/generate_stream"):
        pass  # stream_group swallowed a ConnectionResetError
    values = samples(text(pipeline.metrics))
    assert values['tgi_request_failure{err="generation"}'] == 1
    assert values['tgi_request_failure{err="dropped"}'] == 1
    assert values["tgi_request_success"] == 0


async def test_submit_leaves_escaping_errors_to_the_handler_wrapper(runtime_dir: str) -> None:
    pipeline = Pipeline(frontend_config(runtime_dir), Health(()))
    with (
        pytest.raises(RequestError),
        submit(pipeline, [request("a")], route="/generate") as g,
    ):
        pipeline._dispatch(ErrorOutput("a", "too long", "validation", 422))
        await g.collect()
    assert "tgi_request_failure{" not in text(pipeline.metrics)


# ---------------------------------------------------------------------------- the app


@pytest.fixture
async def client(frontend_client) -> TestClient:
    return await frontend_client(max_concurrent_requests=1)


async def test_metrics_route_and_request_counting(client: TestClient, runtime_dir: str) -> None:
    assert (await client.post("/generate", json={"inputs": ""})).status == 422
    fe = client.app[FRONTEND]
    fe.admission.in_flight = 1  # full
    assert (await client.post("/v1/completions", json={"prompt": "hi"})).status == 429
    fe.admission.in_flight = 0
    assert (await client.post("/tokenize", json={"inputs": ""})).status == 422  # not a generation route
    await _send_stats(runtime_dir, stats(queue_size=9))

    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    values = samples(await response.text())
    assert values["tgi_request_count"] == 2
    assert values['tgi_request_failure{err="validation"}'] == 1
    assert values['tgi_request_failure{err="overloaded"}'] == 1
    assert values["tgi_queue_size"] == 9


async def _send_stats(runtime_dir: str, msg: SchedulerStats) -> None:
    """Send ``msg`` to the frontend socket, as the scheduler does, and wait until it is applied."""
    ctx = zmq.asyncio.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"ipc://{runtime_dir}/frontend.sock")
    await push.send(messages.encode(msg))
    ctx.destroy(linger=1000)
    await asyncio.sleep(0.2)
