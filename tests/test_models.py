"""Every architecture of the zoo gives transformers' greedy tokens and logits (random tiny models)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers import ARCHITECTURES, SEQ2SEQ, hf_greedy, hf_logits, run_engine, tiny_model
from tgi_zmq.attention import AttentionMetadata
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.messages import SamplingParams
from tgi_zmq.model_runner import ModelRunner
from tgi_zmq.scheduler import Request, Scheduler
from tgi_zmq.step import build_step


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model_dir(request, tmp_path_factory):
    return request.param, tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def test_greedy_alone_and_batched_match_transformers(model_dir):
    arch, folder = model_dir
    ps = prompts(6, seed=1)
    expected = [hf_greedy(folder, p, 10) for p in ps]
    assert run_engine(folder, [ps[0]], [SamplingParams()], 10)[0] == expected[:1]
    params = [SamplingParams()] * len(ps)
    # A 5-token step budget chunks every prefill (T5: spreads the encoders over steps); a few blocks
    # of 4 tokens make a 16-token budget preempt (T5's encoder K/V take pages too).
    chunked, _ = run_engine(folder, ps, params, 10, num_blocks=30, max_step_tokens=5)
    few = 16 if arch in SEQ2SEQ else 30
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
    sched = Scheduler(BlockManager(64, 4), 512, 8, (), 10_000)
    if seq2seq:
        req = Request("r", [runner.model.cfg.decoder_start_token_id, *continuation], SamplingParams(), 1)
        req.encoder_ids = prompt
    else:
        req = Request("r", prompt + continuation, SamplingParams(), 1)
    sched.add(req)
    step = build_step(sched.schedule(), 4)
    meta = AttentionMetadata.build(step, 4)
    rows = torch.arange(len(step["input_ids"]))
    return runner.model.forward(step, runner.cache, meta, rows)


def test_t5_with_relu_and_tied_embeddings(tmp_path):
    """The original T5 (v1.0): ReLU feed-forward, LM head tied to the (rescaled) embeddings."""
    folder = tiny_model("t5", tmp_path, feed_forward_proj="relu", tie_word_embeddings=True)
    ps = prompts(3, seed=4)
    expected = [hf_greedy(folder, p, 8) for p in ps]
    assert run_engine(folder, ps, [SamplingParams()] * 3, 8)[0] == expected
    err = (forward_logits(True, folder, ps[0], ps[1]) - hf_logits(folder, ps[0], ps[1])).abs().max().item()
    assert err < 1e-4
