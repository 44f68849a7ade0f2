"""Next-token choice for a batch of rows, each with its own parameters.

Order as in TGI: logits processors (a vocabulary mask, a logit bias) -> repetition penalty ->
frequency penalty -> temperature -> top-k -> top-p -> sample (or argmax for greedy rows).
Sampling uses the exponential race (``argmax(probs / Exp(1))``) with noise from a generator
seeded by ``(seed, index of the token)``: the draw for a request's n-th token depends only on
its own seed, not on what else is in the batch, nor on whether the request was preempted and
recomputed.

Everything runs on the logits' device; the branches are taken from host integers
(``SamplingMetadata.draws``), so greedy and penalised rows never read a device value back. A
random row's noise is drawn on the CPU (the same tokens on every device) and copied over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import torch

_MASK64 = (1 << 64) - 1


class LogitsProcessor(Protocol):
    """Changes the float32 logits [R, vocab] of a step's sampling rows in place, on their device.

    The hook between the forward and the sampler (``ModelRunner.sample``). Structured output
    will pass a ``VocabMask``; a processor must not read values back to the host.
    """

    def __call__(self, logits: torch.Tensor) -> None: ...


@dataclasses.dataclass
class VocabMask:
    """Only the allowed tokens of each row can be chosen; a row that allows all is unconstrained."""

    allowed: torch.Tensor  # [R, vocab] bool

    def __call__(self, logits: torch.Tensor) -> None:
        logits.masked_fill_(~self.allowed, float("-inf"))


@dataclasses.dataclass
class LogitBias:
    bias: torch.Tensor  # [R, vocab] float32, 0 where a row has no bias

    def __call__(self, logits: torch.Tensor) -> None:
        logits += self.bias


@dataclasses.dataclass(frozen=True)
class Draw:
    """The host-side parameters of one row that samples at random."""

    row: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    index: int  # the token's index among the request's outputs


@dataclasses.dataclass
class SamplingMetadata:
    """What the sampler needs for one step's rows, on their device (plus host-side draws)."""

    repetition_penalty: torch.Tensor  # [R] float32
    frequency_penalty: torch.Tensor  # [R] float32
    counts: torch.Tensor | None  # [R, vocab] float32 token counts of each row's history; None: no penalties
    history_lens: torch.Tensor | None  # [R] float32
    draws: list[Draw]  # rows that sample at random; the others are greedy


def mix_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): a well-spread 63-bit generator seed."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (HF/CTRL style) and frequency penalties from each row's token counts."""
    rep = meta.repetition_penalty.view(-1, 1)
    freq = meta.frequency_penalty.view(-1, 1)
    present = (meta.counts > 0) & (rep != 1.0)
    logits = torch.where(present, torch.where(logits < 0, logits * rep, logits / rep), logits)
    return logits - freq * meta.counts / meta.history_lens.clamp(min=1).view(-1, 1)


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p for one row; filtered tokens get -inf."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # keeps at least the first token
        logits = logits.index_fill(0, order[outside], float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, meta: SamplingMetadata, processors: Sequence[LogitsProcessor] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row. Returns (token ids [R] int64, their logprobs [R] float32)."""
    logits = logits.to(torch.float32, copy=bool(processors))  # processors work in place, on our copy
    for processor in processors:
        processor(logits)
    if meta.counts is not None:
        logits = apply_penalties(logits, meta)
    next_ids = logits.argmax(-1)
    logprobs = torch.log_softmax(logits, -1)
    for draw in meta.draws:
        next_ids[draw.row], logprobs[draw.row] = _sample_row(logits[draw.row], draw)
    chosen = logprobs.gather(1, next_ids.view(-1, 1)).view(-1)
    return next_ids, chosen


def _sample_row(row_logits: torch.Tensor, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
    scores = warp(row_logits, draw.temperature, draw.top_k, draw.top_p)
    probs = scores.softmax(-1)
    # the noise comes from a CPU generator on every device: CUDA's draws other numbers for a seed
    gen = torch.Generator().manual_seed(mix_seed(draw.seed, draw.index))
    noise = torch.empty(probs.shape, dtype=probs.dtype).exponential_(generator=gen).to(probs.device)
    token = torch.argmax(probs / noise)
    return token, torch.log_softmax(scores, -1)
