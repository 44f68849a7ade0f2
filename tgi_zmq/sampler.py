"""Next-token choice for a batch of rows, each with its own parameters.

Order as in TGI: watermark -> repetition penalty -> frequency penalty -> logits processors (a logit
bias, a grammar's vocabulary mask) -> temperature -> top-k -> top-p -> typical-p -> sample (or argmax
for greedy rows). The logprobs returned (of the chosen token and of the most likely ones) are those
of the distribution the token was drawn from, as TGI's.
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

from tgi_zmq import native
from tgi_zmq.step import Draw

_MASK64 = (1 << 64) - 1


class LogitsProcessor(Protocol):
    """Changes the float32 logits [R, vocab] of a step's sampling rows in place, on their device.

    The hook between the forward and the sampler (``ModelRunner.sample``): structured output passes
    a ``VocabMask``, ``logit_bias`` and ``min_tokens`` a ``LogitBias``; a processor must not read
    values back to the host. ``select`` gives the same processor for some rows only (when one row
    fails, the worker samples each row alone).
    """

    def __call__(self, logits: torch.Tensor) -> None: ...

    def select(self, rows: list[int]) -> LogitsProcessor:
        """This processor for ``rows`` (of R) only, in that order."""


@dataclasses.dataclass
class VocabMask:
    """Only the allowed tokens of each row can be chosen; a row that allows all is unconstrained."""

    allowed: torch.Tensor  # [R, vocab] bool

    def __call__(self, logits: torch.Tensor) -> None:
        logits.masked_fill_(~self.allowed, float("-inf"))

    def select(self, rows: list[int]) -> VocabMask:
        return VocabMask(self.allowed[rows])


@dataclasses.dataclass
class LogitBias:
    """Sparse biases: ``values[i]`` is added to the logit of token ``ids[i]`` in row ``rows[i]``.

    A token the logits do not have is not applied (it must not index past them): ``unknown_rows``
    says which rows asked for one, so that they fail."""

    rows: torch.Tensor  # [N] int64
    ids: torch.Tensor  # [N] int64
    values: torch.Tensor  # [N] float32 (-inf bans the token)

    def __call__(self, logits: torch.Tensor) -> None:
        known = self._known(logits.shape[-1])
        ids, values = torch.where(known, self.ids, 0), torch.where(known, self.values, 0.0)
        logits.index_put_((self.rows, ids), values, accumulate=True)

    def unknown_rows(self, num_rows: int, vocab_size: int) -> torch.Tensor:
        """[num_rows] bool: the rows with a bias on a token outside ``vocab_size`` (no host read)."""
        unknown = (~self._known(vocab_size)).int()
        per_row = torch.zeros(num_rows, dtype=torch.int32, device=self.ids.device)
        return per_row.index_add_(0, self.rows, unknown) > 0

    def select(self, rows: list[int]) -> LogitBias:
        wanted = self.rows.view(-1, 1) == torch.tensor(rows, device=self.rows.device).view(1, -1)
        kept = wanted.any(1)
        return LogitBias(wanted[kept].int().argmax(1), self.ids[kept], self.values[kept])

    def _known(self, vocab_size: int) -> torch.Tensor:
        return (self.ids >= 0) & (self.ids < vocab_size)


@dataclasses.dataclass(frozen=True)
class Watermark:
    """Kirchenbauer et al.'s watermark as TGI applies it: before each token, a ``gamma`` share of the
    vocabulary (the "green list", a permutation seeded by the previous token) gets ``delta`` added.
    The permutation comes from a CPU generator, so every device gives the same list."""

    gamma: float = 0.5
    delta: float = 2.0
    hash_key: int = 15485863

    def greenlist(self, previous_token: int, vocab_size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.hash_key * previous_token) % (2**64 - 1))
        return torch.randperm(vocab_size, generator=gen)[: int(vocab_size * self.gamma)]

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, int]]) -> None:
        """Bias ``logits[row]``'s green list, for each ``(row, previous token)``."""
        for row, previous in rows:
            green = self.greenlist(previous, logits.shape[-1]).to(logits.device)
            logits[row, green] += self.delta


@dataclasses.dataclass
class SamplingMetadata:
    """What the sampler needs for one step's rows, on their device (plus host-side draws)."""

    repetition_penalty: torch.Tensor  # [R] float32
    frequency_penalty: torch.Tensor  # [R] float32
    counts: torch.Tensor | None  # [R, vocab] float32 token counts of each row's history; None: no penalties
    history_lens: torch.Tensor | None  # [R] float32
    draws: list[Draw]  # rows that sample at random; the others are greedy
    top_n: int = 0  # also return each row's ``top_n`` most likely tokens
    watermarked: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (row, previous token)
    watermark: Watermark = Watermark()

    def select(self, rows: list[int]) -> SamplingMetadata:
        """The metadata of ``rows`` (of R) only, renumbered in that order."""
        index = torch.tensor(rows, device=self.repetition_penalty.device)
        position = {row: i for i, row in enumerate(rows)}
        return SamplingMetadata(
            self.repetition_penalty[index],
            self.frequency_penalty[index],
            None if self.counts is None else self.counts[index],
            None if self.history_lens is None else self.history_lens[index],
            [dataclasses.replace(d, row=position[d.row]) for d in self.draws if d.row in position],
            self.top_n,
            [(position[row], previous) for row, previous in self.watermarked if row in position],
            self.watermark,
        )


@dataclasses.dataclass
class Sampled:
    """A step's choices, on the logits' device: one token per row, and the most likely ones."""

    ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor  # [R] float32
    top_ids: torch.Tensor  # [R, top_n] int64
    top_logprobs: torch.Tensor  # [R, top_n] float32 (-inf: a token the row could not draw)


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


def warp(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, typical_p: float = 1.0
) -> torch.Tensor:
    """Temperature, top-k, top-p and typical-p for one row; filtered tokens get -inf."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # keeps at least the first token
        logits = logits.index_fill(0, order[outside], float("-inf"))
    if typical_p < 1.0:
        logits = _typical(logits, typical_p)
    return logits


def _typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to
    ``mass`` of probability (always at least one)."""
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).nansum()
    distance, order = torch.sort((-logp - entropy).abs())
    cumulative = logits[order].softmax(-1).cumsum(-1)
    last = int((cumulative < mass).sum().clamp(max=logits.shape[-1] - 1))
    outside = distance > distance[last]
    return logits.index_fill(0, order[outside], float("-inf"))


def sample(
    logits: torch.Tensor, meta: SamplingMetadata, processors: Sequence[LogitsProcessor] = ()
) -> Sampled:
    """Choose one token per row, with its logprob and the ``meta.top_n`` most likely tokens."""
    logits = logits.to(torch.float32, copy=bool(processors or meta.watermarked))  # in place below: our copy
    if meta.watermarked:
        meta.watermark.apply(logits, meta.watermarked)
    if meta.counts is not None:
        logits = apply_penalties(logits, meta)
    for processor in processors:
        processor(logits)
    if not meta.top_n:  # the usual step: no top tokens asked, so no [rows, vocab] of logprobs
        next_ids, chosen = greedy(logits)
        for draw in meta.draws:
            token, row_logprobs = _sample_row(logits[draw.row], draw)
            next_ids[draw.row], chosen[draw.row] = token, row_logprobs[token]
        empty = chosen.new_empty(len(chosen), 0)
        return Sampled(next_ids, chosen, empty.long(), empty)
    next_ids = logits.argmax(-1)
    logprobs = torch.log_softmax(logits, -1)
    for draw in meta.draws:
        next_ids[draw.row], logprobs[draw.row] = _sample_row(logits[draw.row], draw)
    chosen = logprobs.gather(1, next_ids.view(-1, 1)).view(-1)
    top_logprobs, top_ids = torch.topk(logprobs, min(meta.top_n, logprobs.shape[-1]), dim=-1)
    return Sampled(next_ids, chosen, top_ids, top_logprobs)


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's most likely token and its logprob: one C++ pass on the CPU (csrc/rowwise.cpp: a c=1
    step spent ~0.2 ms in torch's argmax, log_softmax over the vocabulary and gather), torch elsewhere."""
    ext = native.extension() if logits.device.type == "cpu" else None
    if ext is not None and logits.is_contiguous():
        return ext.greedy(logits, native.ISA)
    ids = logits.argmax(-1)
    return ids, torch.log_softmax(logits, -1).gather(1, ids.view(-1, 1)).view(-1)


def _sample_row(row_logits: torch.Tensor, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
    scores = warp(row_logits, draw.temperature, draw.top_k, draw.top_p, draw.typical_p)
    probs = scores.softmax(-1)
    # the noise comes from a CPU generator on every device: CUDA's draws other numbers for a seed
    gen = torch.Generator().manual_seed(mix_seed(draw.seed, draw.index))
    noise = torch.empty(probs.shape, dtype=probs.dtype).exponential_(generator=gen).to(probs.device)
    token = torch.argmax(probs / noise)
    return token, torch.log_softmax(scores, -1)
