"""Whole steps with the weights, the KV cache and the step's tensors on PyTorch's ``meta`` device.

Meta tensors have shapes and no data, which makes them a stand-in for a GPU on a CPU-only machine:
an operation that mixes in a tensor made on the CPU fails ("Tensor on device cpu is not on the
expected device meta"), and so does reading a value back to the host (``.item()``, ``.tolist()``,
``bool(tensor)``, ``.cpu()``), the host synchronisation a GPU step must not have. The policy and
the step builder run on the CPU, as in the service; ``ModelRunner.execute`` moves the step to the
runner's device.

Covered: prefills, a prefill chunk that continues over cached pages, decodes, T5's encoder, greedy
rows and a greedy row with a repetition penalty (its token counts live on the device). Out of
scope: rows that sample at random, which draw their noise from a generator seeded per row on the
host (``sampler._sample_row``).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ARCHITECTURES, SEQ2SEQ
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.messages import SamplingParams, ScheduleRequest
from tgi_zmq.model_runner import ModelRunner
from tgi_zmq.policy import Request, SchedulePolicy
from tgi_zmq.step import build_step

BLOCK_SIZE = 4
PROMPT_LENS = (7, 20, 2)  # with a 12-token budget: a prefill, a chunked prompt, a late arrival
PARAMS = (SamplingParams(), SamplingParams(repetition_penalty=1.3), SamplingParams())


def kinds(starts: list[int], num_new: list[int]) -> set[str]:
    """What the step's requests run: a prefill from nothing cached, a continuation over cached pages,
    or a decode."""
    return {
        "decode" if n == 1 and s > 0 else "continuation" if s > 0 else "prefill"
        for s, n in zip(starts, num_new, strict=True)
    }


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_steps_run_on_the_meta_device(arch, tiny_models):
    folder = tiny_models(arch)
    runner = ModelRunner(str(folder), "float32", "meta", 64, BLOCK_SIZE, max_rows=8, max_total_tokens=256)
    assert runner.cache.k[0].is_meta and runner.states.pages.is_meta
    vocab = runner.model.cfg.vocab_size
    sched = SchedulePolicy(BlockManager(64, BLOCK_SIZE), 12, 8, (), 256)
    start = getattr(runner.model.cfg, "decoder_start_token_id", None)  # seq2seq: prompts go to the encoder
    for i, (n, params) in enumerate(zip(PROMPT_LENS, PARAMS, strict=True)):
        prompt = [3 + (7 * i + j) % 500 for j in range(n)]
        sched.add(Request.from_schedule(ScheduleRequest(f"r{i}", prompt, params, 4, 0.0), start))
    seen: set[str] = set()
    while (batch := sched.schedule()) is not None:
        seen |= kinds(batch.starts, batch.num_new)
        out = runner.execute(build_step(batch, BLOCK_SIZE))
        rows = batch.num_samples
        assert out.next_ids.is_meta and out.next_ids.shape == (rows,) and out.next_ids.dtype == torch.int64
        assert out.logprobs.is_meta and out.logprobs.shape == (rows,)
        sched.update(batch, [5] * rows, [0.0] * rows)  # meta ids cannot be read back: fake ones
    assert not sched.has_work()
    assert runner.states.counts.shape == (8, vocab)  # the penalised row's counts were kept
    # T5's prompts go through the encoder: its decoder starts from one token, never a chunk.
    assert seen == ({"prefill", "decode"} if arch in SEQ2SEQ else {"prefill", "continuation", "decode"})
