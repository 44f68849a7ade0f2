"""Every Prometheus metric of ``GET /metrics``, under TGI's names, in a registry of our own.

The frontend updates the request-level metrics itself; the batch and KV-cache metrics come
from the scheduler's ``SchedulerStats`` messages; the per-stage times of a request
(``tgi_request_stage_duration{stage}``) come on its last delta, measured by each process.

Beside them, the gauges and counters routers read from a vLLM engine, under vLLM's names and
``model_name`` label (what llm-d's and SMG's load-aware policies read): requests waiting
and running, the KV cache's usage (blocks held only by the prefix cache are reusable: free, as in
vLLM), its block size and count, and the prefix cache's queried and hit tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from tgi_zmq.errors import RequestError
from tgi_zmq.messages import SchedulerStats, StageTimes

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# TGI's router: 35 geometric buckets from 0.00015 s (x1.5) for every "*_duration" histogram,
# multiplied step by step as TGI does, so that the ``le`` labels are the same floats.
DURATION_BUCKETS = tuple(itertools.accumulate(range(35), lambda value, _: value * 1.5, initial=0.0001))[1:]
FORWARD_METHODS = ("prefill", "decode")
STAGES = ("tokenize", "queue", "prefill", "decode", "detokenize")  # the fields of ``StageTimes``


def length_buckets(max_tokens: int) -> tuple[float, ...]:
    """TGI's token-count buckets: 100 linear steps up to ``max_tokens``."""
    return tuple(max_tokens / 100.0 * (i + 1) for i in range(100))


def _histogram(
    registry: CollectorRegistry,
    name: str,
    documentation: str,
    buckets: tuple[float, ...] = DURATION_BUCKETS,
    labels: list[str] | None = None,
) -> Histogram:
    return Histogram(name, documentation, labels or (), buckets=buckets, registry=registry)


class BareCounter(Collector):
    """A counter exposed under its bare name (``tgi_request_count``, not ``..._total``), as TGI's are.

    prometheus_client's ``Counter`` always exposes ``<name>_total``; ``Metrics.render`` fixes the
    ``# HELP``/``# TYPE`` lines that ``generate_latest`` writes for these families.
    """

    def __init__(self, name: str, documentation: str, label: str | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self._values: dict[str | None, float] = {} if label else {None: 0.0}

    def inc(self, label_value: str | None = None, amount: float = 1.0) -> None:
        if (label_value is None) != (self.label is None):
            raise ValueError(f"{self.name}: label value {label_value!r} for label {self.label!r}")
        self._values[label_value] = self._values.get(label_value, 0.0) + amount

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "counter")
        for label_value, value in sorted(self._values.items(), key=lambda kv: kv[0] or ""):
            labels = {} if self.label is None else {self.label: label_value}
            metric.add_sample(self.name, labels, value)
        yield metric

    def fix_header(self, text: str) -> str:
        """``generate_latest`` names a counter family ``<name>_total`` in its HELP and TYPE lines."""
        for kind in ("HELP", "TYPE"):
            text = text.replace(f"# {kind} {self.name}_total ", f"# {kind} {self.name} ")
        return text


class Metrics:
    """The frontend's metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(
        self,
        *,
        max_input_tokens: int,
        max_total_tokens: int,
        model_name: str,
        block_size: int,
        num_blocks: int,
    ) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._bare = [
            count := BareCounter("tgi_request_count", "Generation requests received"),
            success := BareCounter("tgi_request_success", "Generation requests that succeeded"),
            failure := BareCounter("tgi_request_failure", "Generation requests that failed", "err"),
            steps := BareCounter("tgi_batch_inference_count", "Steps run", "method"),
        ]
        for counter in self._bare:
            r.register(counter)
        self.request_count, self.request_success, self.request_failure = count, success, failure
        self.batch_inference_count = steps
        for method in FORWARD_METHODS:
            steps.inc(method, 0.0)

        self._request_histograms(max_input_tokens, max_total_tokens)
        self._batch_histograms()

        self.queue_size = Gauge("tgi_queue_size", "Requests waiting for their first step", registry=r)
        self.batch_current_size = Gauge("tgi_batch_current_size", "Requests running", registry=r)
        self.batch_max_total_tokens = Gauge(
            "tgi_batch_max_total_tokens", "Token capacity of the KV cache", registry=r
        )
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens",
            "Tokens the running requests may grow to (prompt + max_new_tokens each)",
            registry=r,
        )
        self.kv_blocks_used = Gauge("tgi_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge("tgi_kv_blocks_total", "KV-cache blocks", registry=r)
        self.kv_blocks_cached = Gauge(
            "tgi_kv_blocks_cached", "KV-cache blocks held only by the prefix cache (reusable)", registry=r
        )
        self.prefix_cache_hit_tokens = Counter(
            "tgi_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache", registry=r
        )
        self.preemptions = Counter(
            "tgi_preemptions_total", "Requests preempted to free KV blocks", registry=r
        )
        self.process_restarts = Counter(
            "tgi_process_restarts_total", "Pipeline processes seen restarting", ["process"], registry=r
        )
        self.request_replays = Counter(
            "tgi_request_replays_total", "Requests sent down the pipeline again after a fault", registry=r
        )
        self._vllm_metrics(model_name, block_size, num_blocks)
        self.block_size, self.num_blocks, self.max_total_tokens = block_size, num_blocks, max_total_tokens
        self.last_stats: SchedulerStats | None = None
        self.gen_throughput = 0.0  # tokens/s over the last stats interval
        self.prefix_queried = self.prefix_hit = 0  # prompt tokens, since the start

    def _request_histograms(self, max_input_tokens: int, max_total_tokens: int) -> None:
        r = self.registry
        self.request_duration = _histogram(r, "tgi_request_duration", "End-to-end request duration (s)")
        self.request_input_length = _histogram(
            r, "tgi_request_input_length", "Prompt length (tokens)", length_buckets(max_input_tokens)
        )
        self.request_generated_tokens = _histogram(
            r,
            "tgi_request_generated_tokens",
            "Generated tokens per request",
            length_buckets(max_total_tokens),
        )
        self.request_max_new_tokens = _histogram(
            r,
            "tgi_request_max_new_tokens",
            "max_new_tokens per request (up to max_total_tokens when not given)",
            length_buckets(max_total_tokens),
        )
        self.request_mean_time_per_token = _histogram(
            r,
            "tgi_request_mean_time_per_token_duration",
            "Mean time between generated tokens after the first (s)",
        )
        self.request_validation_duration = _histogram(
            r,
            "tgi_request_validation_duration",
            "Time to validate and tokenize a request, in the tokenizer (s)",
        )
        self.request_inference_duration = _histogram(
            r, "tgi_request_inference_duration", "Time from a request's first step to its last token (s)"
        )
        self.request_queue_duration = _histogram(
            r, "tgi_request_queue_duration", "Time from arrival to the first step (s)"
        )
        self.request_stage_duration = _histogram(
            r,
            "tgi_request_stage_duration",
            "Time a request spent in each pipeline stage, measured in the process that runs it (s): "
            "tokenize (tokenizer), queue (arrival at the scheduler -> first step), prefill (first step -> "
            "first token), decode (first token -> last), detokenize (detokenizer)",
            labels=["stage"],
        )
        for stage in STAGES:
            self.request_stage_duration.labels(stage=stage)

    def _batch_histograms(self) -> None:
        r, method = self.registry, ["method"]
        self.batch_forward_duration = _histogram(
            r, "tgi_batch_forward_duration", "Forward pass duration (s)", labels=method
        )
        self.batch_inference_duration = _histogram(
            r,
            "tgi_batch_inference_duration",
            "Step duration from its launch to its result, in the scheduler (s)",
            labels=method,
        )
        self.batch_decode_duration = _histogram(
            r,
            "tgi_batch_decode_duration",
            "A step's time after its forward: sampling, in the worker (s)",
            labels=method,
        )
        for name in FORWARD_METHODS:
            for histogram in (
                self.batch_forward_duration,
                self.batch_inference_duration,
                self.batch_decode_duration,
            ):
                histogram.labels(method=name)
        sizes = tuple(float(size) for size in range(1, 1025))  # TGI's buckets: 1 to 1024
        self.batch_next_size = _histogram(
            r, "tgi_batch_next_size", "Requests a step took in from the queue", sizes
        )

    def _vllm_metrics(self, model_name: str, block_size: int, num_blocks: int) -> None:
        r, label = self.registry, ["model_name"]

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, label, registry=r).labels(model_name=model_name)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, label, registry=r).labels(model_name=model_name)

        self.vllm_waiting = gauge("vllm:num_requests_waiting", "Requests waiting for their first step")
        self.vllm_running = gauge("vllm:num_requests_running", "Requests running")
        self.vllm_kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage, 1 full (blocks held only by the prefix cache: free)"
        )
        info = Gauge(
            "vllm:cache_config_info",
            "The KV cache's layout",
            [*label, "block_size", "num_gpu_blocks"],
            registry=r,
        )
        info.labels(model_name=model_name, block_size=str(block_size), num_gpu_blocks=str(num_blocks)).set(1)
        self.vllm_prefix_queries = counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache"
        )
        self.vllm_prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache")

    def render(self) -> bytes:
        """The Prometheus text exposition (content type ``CONTENT_TYPE_LATEST``)."""
        text = generate_latest(self.registry).decode()
        for counter in self._bare:
            text = counter.fix_header(text)
        return text.encode()

    # ------------------------------------------------------------------ request outcomes

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count one generation request, and its failure if an exception escapes its handler.

        Handlers that return normally report their outcome themselves (``succeeded``/``failed``):
        an error inside a 200 stream, or a client gone mid-stream, never reaches here.
        """
        self.request_count.inc()
        try:
            yield
        except RequestError as exc:
            self.failed(exc.error_type)
            raise
        except (asyncio.CancelledError, ConnectionError):
            self.failed("dropped")
            raise
        except Exception:
            self.failed("internal")
            raise

    def succeeded(self) -> None:
        self.request_success.inc()

    def failed(self, err: str) -> None:
        self.request_failure.inc(err)

    def generation_finished(
        self,
        *,
        seconds: float,
        prompt_tokens: int,
        generated_tokens: int,
        decode_seconds: float,
        max_new_tokens: int | None,
    ) -> None:
        """One generation ran to its end (``decode_seconds``: from its first token to its last;
        ``max_new_tokens`` as asked, None: up to ``max_total_tokens``)."""
        self.request_duration.observe(seconds)
        self.request_max_new_tokens.observe(
            max_new_tokens if max_new_tokens is not None else self.max_total_tokens - prompt_tokens
        )
        self.request_input_length.observe(prompt_tokens)
        self.request_generated_tokens.observe(generated_tokens)
        if generated_tokens > 1:
            self.request_mean_time_per_token.observe(decode_seconds / (generated_tokens - 1))

    def observe_stages(self, stages: StageTimes) -> None:
        """A finished request's time in each stage (and TGI's validation and inference durations)."""
        for stage in STAGES:
            self.request_stage_duration.labels(stage=stage).observe(getattr(stages, stage))
        self.request_validation_duration.observe(stages.tokenize)
        self.request_inference_duration.observe(stages.prefill + stages.decode)

    # ------------------------------------------------------------------ scheduler

    def observe_scheduler(self, stats: SchedulerStats) -> None:
        self.queue_size.set(stats.queue_size)
        self.batch_current_size.set(stats.batch_size)
        self.batch_max_total_tokens.set(stats.max_batch_total_tokens)
        self.kv_blocks_used.set(stats.kv_blocks_used)
        self.kv_blocks_total.set(stats.kv_blocks_total)
        self.kv_blocks_cached.set(stats.kv_blocks_cached)
        self.prefix_cache_hit_tokens.inc(max(stats.prefix_cache_hit_tokens, 0))
        self.preemptions.inc(max(stats.preemptions, 0))
        self.vllm_waiting.set(stats.queue_size)
        self.vllm_running.set(stats.batch_size)
        held = stats.kv_blocks_used - stats.kv_blocks_cached
        self.vllm_kv_usage.set(held / stats.kv_blocks_total if stats.kv_blocks_total else 0.0)
        self.vllm_prefix_queries.inc(max(stats.prefix_cache_query_tokens, 0))
        self.vllm_prefix_hits.inc(max(stats.prefix_cache_hit_tokens, 0))
        self.last_stats = stats
        if stats.interval_seconds > 0:
            self.gen_throughput = max(stats.generated_tokens, 0) / stats.interval_seconds
        self.prefix_queried += max(stats.prefix_cache_query_tokens, 0)
        self.prefix_hit += max(stats.prefix_cache_hit_tokens, 0)
        for seconds in stats.queue_seconds:
            self.request_queue_duration.observe(seconds)
        self.batch_current_max_tokens.set(stats.batch_max_tokens)
        for forward in stats.forward_seconds:  # typed by the codec: a malformed stats frame never gets here
            self.batch_forward_duration.labels(method=forward.method).observe(forward.seconds)
            self.batch_inference_duration.labels(method=forward.method).observe(forward.inference_seconds)
            self.batch_decode_duration.labels(method=forward.method).observe(forward.decode_seconds)
            self.batch_inference_count.inc(forward.method)
            if forward.admitted:
                self.batch_next_size.observe(forward.admitted)

    # ------------------------------------------------------------------ SGLang's /v1/loads

    def load(self, max_running_requests: int) -> dict[str, Any]:
        """This engine's row of ``GET /v1/loads`` (one rank), in the types SMG reads: the scheduler's
        latest figures; the KV tokens held by requests (not those only the prefix cache keeps)."""
        stats = self.last_stats
        running, waiting = (stats.batch_size, stats.queue_size) if stats else (0, 0)
        held_blocks = stats.kv_blocks_used - stats.kv_blocks_cached if stats else 0
        capacity = self.num_blocks * self.block_size
        usage = held_blocks * self.block_size / capacity if capacity else 0.0
        return {
            "dp_rank": 0,
            "num_running_reqs": running,
            "num_waiting_reqs": waiting,
            "num_total_reqs": running + waiting,
            "num_used_tokens": held_blocks * self.block_size,
            "max_total_num_tokens": capacity,
            "token_usage": usage,
            "gen_throughput": self.gen_throughput,
            "cache_hit_rate": self.prefix_hit / self.prefix_queried if self.prefix_queried else 0.0,
            "utilization": usage,
            "max_running_requests": max_running_requests,
        }
