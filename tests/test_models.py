"""Every architecture of the zoo gives transformers' greedy tokens and logits (random tiny models);
on Llama, the engine's scheduling (chunks, preemption, overlap, prefix cache, decode groups) and
its penalties give transformers' tokens too."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    ARCHITECTURES,
    SEQ2SEQ,
    FrequencyPenalty,
    hf_greedy,
    hf_logits,
    run_engine,
    tiny_model,
)
from tgi_zmq import native
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.messages import SamplingParams
from tgi_zmq.model_runner import ModelRunner
from tgi_zmq.policy import Request, SchedulePolicy
from tgi_zmq.step import build_step


@pytest.fixture(params=ARCHITECTURES)
def model_dir(request, tiny_models):
    return request.param, tiny_models(request.param)


@pytest.fixture
def llama_dir(tiny_models):
    return tiny_models("llama")


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


# ---------------------------------------------------------------------------------- every architecture


def test_greedy_alone_and_batched_match_transformers(model_dir):
    arch, folder = model_dir
    ps = prompts(6, seed=1)
    expected = [hf_greedy(folder, p, 10) for p in ps]
    assert run_engine(folder, [ps[0]], [SamplingParams()], 10)[0] == expected[:1]
    params = [SamplingParams()] * len(ps)
    # A 5-token step budget chunks every prefill (T5: spreads the encoders over steps); a few blocks
    # of 4 tokens make a 16-token budget preempt (T5's encoder K/V take pages too; a model whose every
    # layer has a window of 8 frees the pages behind it, so it runs in fewer).
    chunked, _ = run_engine(folder, ps, params, 10, num_blocks=30, max_step_tokens=5)
    few = {"t5": 16, "mistral": 12, "starcoder2": 12}.get(arch, 30)
    preempted, sched = run_engine(folder, ps, params, 10, num_blocks=few, max_step_tokens=16, overlap=True)
    assert sched.num_preemptions > 0
    assert chunked == preempted == expected


def test_logits_of_one_forward_match_transformers(model_dir):
    arch, folder = model_dir
    prompt, continuation = prompts(2, seed=3)
    ours = forward_logits(arch in SEQ2SEQ, folder, prompt, continuation)
    theirs = hf_logits(folder, prompt, continuation)
    err = (ours - theirs).abs().max().item()
    print(f"{arch}: max abs logit error {err:.2e} over {tuple(ours.shape)}")
    assert err < 1e-4


def forward_logits(seq2seq: bool, folder, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Our logits for every decoder position, from one prefill step of prompt + continuation."""
    runner = ModelRunner(str(folder), "float32", "cpu", 64, 4)
    sched = SchedulePolicy(BlockManager(64, 4), 512, 8, (), 10_000)
    if seq2seq:
        req = Request("r", [runner.model.cfg.decoder_start_token_id, *continuation], SamplingParams(), 1)
        req.encoder_ids = prompt
    else:
        req = Request("r", prompt + continuation, SamplingParams(), 1)
    sched.add(req)
    step = build_step(sched.schedule(), 4)
    runner.states.apply(step)
    batch = runner.forward_batch(step, step.layout())
    batch.logit_rows = torch.arange(len(step.inputs.input_ids))
    return runner.model.forward(batch, runner.cache)


def test_t5_with_relu_and_tied_embeddings(tmp_path):
    """The original T5 (v1.0): ReLU feed-forward, LM head tied to the (rescaled) embeddings."""
    folder = tiny_model("t5", tmp_path, feed_forward_proj="relu", tie_word_embeddings=True)
    ps = prompts(3, seed=4)
    expected = [hf_greedy(folder, p, 8) for p in ps]
    assert run_engine(folder, ps, [SamplingParams()] * 3, 8)[0] == expected
    err = (forward_logits(True, folder, ps[0], ps[1]) - hf_logits(folder, ps[0], ps[1])).abs().max().item()
    assert err < 1e-4


@pytest.mark.parametrize("overrides", [dict(tie_word_embeddings=False), dict(use_bias=False)])
def test_starcoder2_untied_or_without_biases(tiny_models, overrides):
    """The other StarCoder2 configs: an LM head of its own, linears without biases (its LayerNorms keep
    theirs)."""
    folder = tiny_models("starcoder2", **overrides)
    ps = prompts(3, seed=4)
    expected = [hf_greedy(folder, p, 8) for p in ps]
    assert run_engine(folder, ps, [SamplingParams()] * 3, 8)[0] == expected
    err = (forward_logits(False, folder, ps[0], ps[1]) - hf_logits(folder, ps[0], ps[1])).abs().max().item()
    assert err < 1e-4


# ---------------------------------------------------------------------------------- sliding windows


@pytest.fixture
def peak_pages(monkeypatch) -> list[int]:
    """Records the pages requests hold after each schedule (the prefix cache's free ones aside)."""
    held: list[int] = []
    schedule = SchedulePolicy.schedule

    def recording(self):
        batch = schedule(self)
        held.append(self.block_manager.capacity - self.block_manager.num_free)
        return batch

    monkeypatch.setattr(SchedulePolicy, "schedule", recording)
    return held


@pytest.mark.parametrize(
    ("arch", "attention"),
    [("mistral", "kernel"), ("mistral", "gathered"), ("mistral", "invariant"), ("starcoder2", "kernel")],
)
def test_a_windowed_model_frees_the_pages_behind_its_window_and_gives_transformers_tokens(
    tiny_models, monkeypatch, arch, attention, peak_pages
):
    """Every layer has a window of 8 and pages hold 4 tokens: contexts of 60-90 tokens free most of
    their pages while they run, alone and batched (overlap, chunks of 16), with a shared 24-token prefix
    taken from the prefix cache though its first pages were freed, and through preemptions. Decodes
    attend in place (the extension's kernel), or over gathered pages (padded groups, where freed entries
    are the null page, masked); ``invariant``: every query row, prompt chunks too, in place."""
    if attention == "gathered":
        monkeypatch.setattr(native, "extension", lambda: None)
    monkeypatch.setattr(native, "INVARIANT", attention == "invariant")
    folder = tiny_models(arch)
    rng = random.Random(12)
    system = [rng.randrange(3, 512) for _ in range(24)]
    ps = [system + [rng.randrange(3, 512) for _ in range(n)] for n in (40, 33, 50, 36)]
    expected = [hf_greedy(folder, p, 24) for p in ps]
    greedy = [SamplingParams()] * len(ps)
    kwargs = dict(max_step_tokens=16, overlap=True)
    assert run_engine(folder, ps[:1], greedy[:1], 24, **kwargs)[0] == expected[:1]
    assert max(peak_pages) <= 8  # of the 22 its 88 tokens fill: the window's, a chunk's, one step's lag
    peak_pages.clear()
    batched, sched = run_engine(folder, ps, greedy, 24, num_blocks=64, arrive_every=2, **kwargs)
    assert batched == expected and sched.num_preemptions == 0
    assert sched.prefix_hit_tokens >= 3 * 24 and max(peak_pages) <= 4 * 8
    preempted, sched = run_engine(folder, ps, greedy, 24, num_blocks=14, **kwargs)
    assert preempted == expected and sched.num_preemptions > 0


# ---------------------------------------------------------------------------------- scheduling (Llama)


@pytest.mark.parametrize("max_step_tokens", [5, 16, 64])
def test_overlapped_scheduling_gives_the_same_tokens(llama_dir, max_step_tokens):
    """The scheduler one step behind the worker (placeholders), with chunking and preemption."""
    ps = prompts(6, seed=1)
    greedy = [SamplingParams()] * 3
    sampled = [SamplingParams(do_sample=True, seed=s, repetition_penalty=1.2) for s in range(3)]
    args = (llama_dir, ps, greedy + sampled, 10)
    kwargs = dict(num_blocks=30, max_step_tokens=max_step_tokens, arrive_every=1)
    lagging, _ = run_engine(*args, overlap=True, **kwargs)
    assert lagging == run_engine(*args, overlap=False, **kwargs)[0]
    assert all(t >= 0 for out in lagging for t in out)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llama_dir):
    ps = prompts(4, seed=2)
    sp = SamplingParams(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=42)
    alone, _ = run_engine(llama_dir, [ps[0]], [sp], 8)
    others = [SamplingParams(do_sample=True, seed=i) for i in range(3)]
    batched, _ = run_engine(llama_dir, ps, [sp, *others], 8)
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


def test_decodes_of_very_different_lengths_match(llama_dir):
    """Short and long contexts decode in separate padded groups (see attention._by_length)."""
    rng = random.Random(9)
    ps = [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 700, 12, 650)]
    expected = [hf_greedy(llama_dir, p, 6) for p in ps]
    got, _ = run_engine(llama_dir, ps, [SamplingParams()] * 4, 6, num_blocks=400, max_step_tokens=2048)
    assert got == expected


# ---------------------------------------------------------------------------------- penalties (Llama)


@functools.cache
def hf_causal_lm(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_generate(folder: Path, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """transformers' greedy continuation of ``prompt`` with extra ``generate`` arguments."""
    out = hf_causal_lm(folder).generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    ("params", "reference"),
    [
        (SamplingParams(repetition_penalty=1.3), dict(repetition_penalty=1.3)),
        (SamplingParams(frequency_penalty=1.5), dict(logits_processor=[FrequencyPenalty(1.5)])),
    ],
    ids=["repetition", "frequency"],
)
def test_greedy_penalties_match_transformers(llama_dir, params, reference):
    """Alone, then batched with unpenalised rows under the overlap schedule (the workers count the
    sampled tokens) and preemption (a recomputed request sends its history again)."""
    ps = prompts(6, seed=11)
    expected = [hf_generate(llama_dir, p, 12, **reference) for p in ps]
    plain = [hf_generate(llama_dir, p, 12) for p in ps]
    assert expected != plain  # the penalty changes tokens here, so the test can tell
    assert run_engine(llama_dir, [ps[1]], [params], 12)[0] == expected[1:2]
    mixed = [params, SamplingParams()] * 3
    got, sched = run_engine(llama_dir, ps, mixed, 12, num_blocks=30, max_step_tokens=16, overlap=True)
    assert sched.num_preemptions > 0
    assert got[0::2] == expected[0::2] and got[1::2] == plain[1::2]


def test_prompt_logprobs_match_transformers_through_chunks_and_preemption(llama_dir):
    """A request that scores its prompt gets each prompt token's logprob, whatever the chunking,
    the batch around it, the overlap and a preemption (its recompute scores the prompt again)."""
    ps = prompts(4, seed=5)
    params = [SamplingParams(prompt_logprobs=True), SamplingParams()] * 2
    done: list = []
    _, sched = run_engine(
        llama_dir, ps, params, 6, num_blocks=14, max_step_tokens=7, overlap=True, requests_out=done
    )
    assert sched.num_preemptions > 0
    for prompt, req in zip(ps[0::2], done[0::2], strict=True):
        assert_prompt_logprobs(llama_dir, prompt, req)
    assert all(req.prompt_logprobs == [] for req in done[1::2])


def assert_prompt_logprobs(folder: Path, prompt: list[int], req: Request) -> None:
    """``req`` has transformers' logprob of each prompt token but the first (None)."""
    expected = hf_logits(folder, prompt, []).log_softmax(-1)
    assert req.prompt_logprobs[0] is None
    got = torch.tensor(req.prompt_logprobs[1:])
    want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert torch.allclose(got, want, atol=1e-4)


def test_requests_that_score_their_prompt_share_a_cap_of_scored_rows_per_step(llama_dir, monkeypatch):
    """However many requests score their prompt, a step scores ``MAX_SCORED_ROWS`` prompt tokens at
    most (a [rows, vocab] float32 logits tensor each), and every prompt logprob still comes back right."""
    from tgi_zmq import policy
    from tgi_zmq.offline import LocalExecutor

    monkeypatch.setattr(policy, "MAX_SCORED_ROWS", 8)
    scored: list[int] = []
    submit = LocalExecutor.submit

    def recording(self, step_id, step):
        scored.append(len(step.sampling.prompt_rows))
        submit(self, step_id, step)

    monkeypatch.setattr(LocalExecutor, "submit", recording)
    ps = [p + [7] * 12 for p in prompts(4, seed=6)]  # 13 tokens or more each
    params = [SamplingParams(prompt_logprobs=True)] * 3 + [SamplingParams()]
    done: list = []
    run_engine(llama_dir, ps, params, 3, max_step_tokens=64, overlap=True, requests_out=done)
    assert max(scored) == 8 and sum(scored) == sum(len(p) - 1 for p in ps[:3])
    for prompt, req in zip(ps[:3], done[:3], strict=True):
        assert_prompt_logprobs(llama_dir, prompt, req)
