"""Our Llama over the paged cache gives transformers' greedy tokens, alone and batched."""

import random

import pytest

from tests.helpers import hf_greedy, run_engine, tiny_llama
from tgi_zmq.messages import SamplingParams


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def test_greedy_alone_matches_transformers(llama_dir):
    for prompt in prompts(3):
        expected = hf_greedy(llama_dir, prompt, 12)
        assert run_engine(llama_dir, [prompt], [SamplingParams()], 12)[0] == [expected]


def test_greedy_batched_with_chunking_and_preemption_matches(llama_dir):
    ps = prompts(6, seed=1)
    expected = [hf_greedy(llama_dir, p, 10) for p in ps]
    params = [SamplingParams()] * len(ps)
    # A 5-token step budget chunks every prefill; 30 blocks of 4 tokens make a 16-token budget preempt.
    chunked, _ = run_engine(llama_dir, ps, params, 10, num_blocks=30, max_step_tokens=5)
    preempted, sched = run_engine(llama_dir, ps, params, 10, num_blocks=30, max_step_tokens=16)
    assert sched.num_preemptions > 0
    assert chunked == preempted == expected


@pytest.mark.parametrize("max_step_tokens", [5, 16, 64])
def test_overlapped_scheduling_gives_the_same_tokens(llama_dir, max_step_tokens):
    """The scheduler one step behind the worker (placeholders), with chunking and preemption."""
    ps = prompts(6, seed=1)
    greedy = [SamplingParams()] * 3
    sampled = [SamplingParams(do_sample=True, seed=s, repetition_penalty=1.2) for s in range(3)]
    args = (llama_dir, ps, greedy + sampled, 10)
    kwargs = dict(num_blocks=30, max_step_tokens=max_step_tokens, arrive_every=1)
    lagging, sched = run_engine(*args, overlap=True, **kwargs)
    assert lagging == run_engine(*args, overlap=False, **kwargs)[0]
    assert all(t >= 0 for out in lagging for t in out)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llama_dir):
    ps = prompts(4, seed=2)
    sp = SamplingParams(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=42)
    alone, _ = run_engine(llama_dir, [ps[0]], [sp], 8)
    batched, _ = run_engine(
        llama_dir, ps, [sp] + [SamplingParams(do_sample=True, seed=i) for i in range(3)], 8
    )
    assert batched[0] == alone[0]


def test_prefix_cache_gives_the_same_tokens(llama_dir):
    system = prompts(1, seed=5)[0] * 4
    ps = [system + p for p in prompts(5, seed=6)]
    expected = [hf_greedy(llama_dir, p, 8) for p in ps]
    params = [SamplingParams()] * len(ps)
    cached, sched = run_engine(llama_dir, ps, params, 8, num_blocks=200, arrive_every=3)
    assert sched.prefix_hit_tokens >= 4 * (len(system) // 4 * 4) - 4
    uncached, sched = run_engine(
        llama_dir, ps, params, 8, num_blocks=200, arrive_every=3, prefix_caching=False
    )
    assert sched.prefix_hit_tokens == 0
    assert cached == uncached == expected


def test_decodes_of_very_different_lengths_match(tmp_path):
    """Short and long contexts decode in separate padded groups (see attention._by_length)."""
    folder = tiny_llama(tmp_path, max_position_embeddings=1024)
    rng = random.Random(9)
    ps = [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 700, 12, 650)]
    expected = [hf_greedy(folder, p, 6) for p in ps]
    got, _ = run_engine(folder, ps, [SamplingParams()] * 4, 6, num_blocks=400, max_step_tokens=2048)
    assert got == expected
