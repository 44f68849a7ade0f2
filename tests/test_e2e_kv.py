"""End to end: prefix caching, preemption under a small KV budget, and no page leaks on disconnects."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import zmq

from tests.conftest import free_port, pids, start_service, stop_service
from tests.helpers import hf_greedy_batch
from tests.kv_event_index import BlockIndex, replay

pytestmark = pytest.mark.e2e

STORY = "once upon a time, in a small village at the foot of a snowy mountain, there lived a clockmaker who"
PREEMPTED_NEW = 24


def metrics(service) -> dict[str, float]:
    """Every sample of /metrics by its name with labels, e.g. ``tgi_queue_size``."""
    text = requests.get(service.url + "/metrics", timeout=5).text
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def wait_for_metric(service, name: str, predicate, timeout: float = 10) -> float:
    deadline = time.time() + timeout
    while True:
        value = metrics(service).get(name, 0.0)
        if predicate(value) or time.time() > deadline:
            return value
        time.sleep(0.3)


def generate(service, prompt: str, max_new_tokens: int) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
    response = requests.post(service.url + "/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_shared_prefix_is_reused(service):
    """The second prompt's shared prefix comes from the cache (how much faster that is: scripts/bench
    --scenario prefix, docs/benchmarks/issue3-prefix.json; tests time nothing)."""
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
    system = " ".join(rng.choice(words) for _ in range(1100))
    system_tokens = len(requests.post(service.url + "/tokenize", json={"inputs": system}, timeout=10).json())
    assert system_tokens > 1000
    hits_before = metrics(service).get("tgi_prefix_cache_hit_tokens_total", 0.0)
    generate(service, system + "\nQuestion one?", 2)
    generate(service, system + "\nSecond question?", 2)
    hits = (
        wait_for_metric(service, "tgi_prefix_cache_hit_tokens_total", lambda v: v > hits_before) - hits_before
    )
    assert hits >= system_tokens - 16, (hits, system_tokens)  # whole 16-token blocks


def test_copies_compute_their_prompt_once(service):
    """``best_of`` (and ``n``) copies: the first computes the prompt, the others take its pages from the
    prefix cache (that they wait for them when they arrive in the same step: test_scheduler_policy)."""
    prompt = " ".join(random.Random(1).choice("red green blue cyan".split()) for _ in range(80))
    tokens = len(requests.post(service.url + "/tokenize", json={"inputs": prompt}, timeout=10).json())
    hits_before = metrics(service).get("tgi_prefix_cache_hit_tokens_total", 0.0)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 2, "best_of": 3, "do_sample": True}}
    assert requests.post(service.url + "/generate", json=body, timeout=300).status_code == 200
    full_pages = (tokens - 1) // 16 * 16
    hits = wait_for_metric(
        service, "tgi_prefix_cache_hit_tokens_total", lambda v: v >= hits_before + 2 * full_pages
    )
    assert hits - hits_before >= 2 * full_pages, (hits - hits_before, tokens)


def test_the_vllm_gauges_routers_read_tell_the_schedulers_state(service):
    """llm-d's and SMG's load signals under vLLM's names: under load they count the requests in flight
    and the pages they hold; once they finished, the pages left to the prefix cache count as free."""
    model = requests.get(service.url + "/info", timeout=5).json()["model_id"]

    def vllm(values: dict[str, float], name: str) -> float:
        return values[f'vllm:{name}{{model_name="{model}"}}']

    prompts = [f"Clock {i}: {STORY}" for i in range(6)]  # no page in common
    tokens = [
        len(requests.post(service.url + "/tokenize", json={"inputs": p}, timeout=10).json()) for p in prompts
    ]
    new = 160  # long enough to be seen running
    body = {"parameters": {"max_new_tokens": new, "ignore_eos": True}}
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = [
            pool.submit(requests.post, service.url + "/generate", json={**body, "inputs": p}, timeout=300)
            for p in prompts
        ]
        deadline = time.time() + 30
        values = metrics(service)
        while vllm(values, "num_requests_running") < len(prompts) and time.time() < deadline:
            time.sleep(0.2)
            values = metrics(service)
        assert (
            vllm(values, "num_requests_running") == len(prompts) and vllm(values, "num_requests_waiting") == 0
        )
        total = values["tgi_kv_blocks_total"]
        held = vllm(values, "kv_cache_usage_perc") * total
        assert held == pytest.approx(values["tgi_kv_blocks_used"] - values["tgi_kv_blocks_cached"])
        least, most = sum(-(-n // 16) for n in tokens), sum(-(-(n + new) // 16) + 1 for n in tokens)
        assert least <= round(held) <= most, (held, least, most)  # their prompts' pages, and what they wrote
        assert values["tgi_batch_current_max_tokens"] == sum(n + new for n in tokens)  # what they may grow to
        url = service.url + "/v1/loads?include=core,disagg,queues,memory"  # as SMG polls it
        load = requests.get(url, timeout=5).json()["loads"][0]  # its own stats message may be newer
        assert load["num_running_reqs"] == load["num_total_reqs"] == len(prompts)
        assert least * 16 <= load["num_used_tokens"] <= most * 16 and load["gen_throughput"] > 0
        assert all(answer.result().status_code == 200 for answer in answers)
    wait_for_metric(service, f'vllm:num_requests_running{{model_name="{model}"}}', lambda v: v == 0)
    values = metrics(service)
    assert vllm(values, "num_requests_running") == vllm(values, "num_requests_waiting") == 0
    assert vllm(values, "kv_cache_usage_perc") == 0 and values["tgi_kv_blocks_cached"] > 0
    layout = f'block_size="16",model_name="{model}",num_gpu_blocks="{int(total)}"'
    assert values[f"vllm:cache_config_info{{{layout}}}"] == 1
    assert vllm(values, "prefix_cache_queries_total") >= sum(tokens)
    for name in (
        'tgi_batch_inference_count{method="decode"}',
        'tgi_batch_decode_duration_count{method="decode"}',
    ):
        assert values[name] > 0, name  # TGI's batch metrics, from the steps
    assert values["tgi_batch_next_size_count"] > 0 and values["tgi_request_max_new_tokens_sum"] >= 6 * new
    loads = requests.get(service.url + "/v1/loads", timeout=5).json()
    assert loads["dp_rank_count"] == 1 and loads["loads"][0]["num_used_tokens"] == 0
    assert loads["loads"][0]["max_total_num_tokens"] == total * 16


@pytest.fixture(scope="module")
def kv_events_ports() -> tuple[int, int]:
    """small_kv's KV-event PUB and replay ports."""
    return free_port(), free_port()


@pytest.fixture(scope="module")
def small_kv(tmp_path_factory, kv_events_ports):
    """A KV cache of 512 tokens: 16 requests of 53 tokens each need almost twice that. Publishes its
    KV-cache events (vLLM's format) under the topic "kv"."""
    live, replays = kv_events_ports
    svc = start_service(
        tmp_path_factory.mktemp("small_kv"),
        *("--dtype", "float32", "--max-batch-total-tokens", "512", "--max-total-tokens", "256"),
        *("--max-concurrent-requests", "32", "--kv-events-topic", "kv"),
        *("--kv-events-endpoint", f"tcp://*:{live}", "--kv-events-replay-endpoint", f"tcp://*:{replays}"),
    )
    yield svc
    stop_service(svc, wait=False)


def test_preemption_keeps_outputs_equal_to_transformers(small_kv):
    """16 requests of 53 tokens where 512 fit: preempted ones recompute and still give transformers'
    greedy tokens (its reference in one batch: the prompts have one length). Long prompts and few new
    tokens: the KV cache fills in few steps, here and in transformers."""
    from transformers import AutoTokenizer

    prompts = [f"Story number {i:02d}: {STORY}" for i in range(16)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: generate(small_kv, p, PREEMPTED_NEW), prompts))
    assert metrics(small_kv)["tgi_preemptions_total"] > 0
    tokenizer = AutoTokenizer.from_pretrained(small_kv.model_dir)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    assert together == hf_greedy_batch(small_kv.model_dir, ids, PREEMPTED_NEW, stop_at_eos=True)


def test_disconnects_leave_only_the_prefix_cache(small_kv):
    rng = random.Random(1)

    def client(i: int) -> None:
        body = {"inputs": f"Request {i} says hello", "parameters": {"max_new_tokens": 60}}
        try:
            requests.post(small_kv.url + "/generate_stream", json=body, timeout=rng.uniform(0.05, 2.0))
        except requests.RequestException:
            pass  # the client gave up: the server must abort the request and free its pages

    threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join()
    idle = wait_for_metric(small_kv, "tgi_batch_current_size", lambda v: v == 0, timeout=120)
    assert idle == 0
    assert wait_for_metric(small_kv, "tgi_queue_size", lambda v: v == 0) == 0
    m = metrics(small_kv)
    assert m["tgi_kv_blocks_used"] == m["tgi_kv_blocks_cached"]
    assert requests.get(small_kv.url + "/health", timeout=5).status_code == 200


class Subscriber:
    """A router's view of small_kv's cache: live events after a replay of those it missed."""

    def __init__(self, ports: tuple[int, int]) -> None:
        self.replay_endpoint = f"tcp://127.0.0.1:{ports[1]}"
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        self.sub.connect(f"tcp://127.0.0.1:{ports[0]}")
        time.sleep(0.3)  # connected before the replay below: what comes after it queues here
        self.index = BlockIndex()
        for sequence, payload in replay(self.replay_endpoint, 0):
            self.index.apply(sequence, payload)

    def drain(self, quiet_s: float = 1.0) -> BlockIndex:
        """Apply live batches until none came for ``quiet_s``; those the replay gave are skipped."""
        while self.sub.poll(int(quiet_s * 1000)):
            topic, sequence, payload = self.sub.recv_multipart()
            sequence = int.from_bytes(sequence, "big")
            if sequence > self.index.last_sequence:
                self.index.apply(sequence, payload)
        return self.index


def test_kv_events_rebuild_the_cached_blocks_through_evictions_and_a_worker_restart(
    small_kv, kv_events_ports
):
    """Runs last on small_kv (it restarts the worker)."""
    from transformers import AutoTokenizer

    subscriber = Subscriber(kv_events_ports)
    assert subscriber.index.last_sequence >= 0  # the earlier tests' events, replayed
    (worker,) = pids(small_kv, "worker")
    os.kill(worker, signal.SIGKILL)
    deadline = time.time() + 60
    while subscriber.index.cleared < 2:  # one at the scheduler's start, one for the restart
        assert time.time() < deadline, "no AllBlocksCleared after the worker's restart"
        subscriber.drain(0.2)
    assert subscriber.index.blocks == {}
    small_kv.wait_healthy()

    tokenizer = AutoTokenizer.from_pretrained(small_kv.model_dir)
    prompts = [f"Note {i:02d}, kept for the events test: {STORY}" for i in range(14)]  # 14 x 3 blocks > 32
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda p: generate(small_kv, p, 4), prompts))
    sequences = [tuple(tokenizer(p)["input_ids"] + out) for p, out in zip(prompts, outputs, strict=True)]
    removed_before = subscriber.index.removed
    index = subscriber.drain()
    assert index.removed > removed_before  # 42 blocks through a cache of 32: evictions
    assert index.blocks, "nothing cached after the workload"
    for chain in index.prompts():
        assert any(seq[: len(chain)] == chain for seq in sequences), "a cached block no request computed"
    wait_for_metric(small_kv, "tgi_batch_current_size", lambda v: v == 0)
    cached = wait_for_metric(small_kv, "tgi_kv_blocks_cached", lambda v: v == len(index.blocks))
    assert cached == len(index.blocks)  # idle: every cached block is held by the prefix cache alone

    late = BlockIndex()
    for sequence, payload in replay(subscriber.replay_endpoint, 0):
        late.apply(sequence, payload)
    assert late.blocks == index.blocks and late.last_sequence == index.last_sequence
    subscriber.sub.close()
