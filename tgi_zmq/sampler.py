"""Next-token choice for a batch of rows, each with its own parameters.

Order as in TGI: repetition penalty -> frequency penalty -> temperature -> top-k -> top-p ->
sample (or argmax for greedy rows). Sampling uses the exponential race
(``argmax(probs / Exp(1))``) with noise from a generator seeded by ``(seed, index of the
token)``: the draw for a request's n-th token depends only on its own seed, not on what
else is in the batch, nor on whether the request was preempted and recomputed.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): a well-spread 63-bit generator seed."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def apply_penalties(logits: torch.Tensor, s: dict[str, torch.Tensor]) -> None:
    """Repetition (HF/CTRL style) and frequency penalties over each row's token history, in place."""
    starts = s["penalty_start"].tolist()
    ids_all = s["penalty_ids"]
    rep = s["repetition_penalty"].tolist()
    freq = s["frequency_penalty"].tolist()
    for row in range(logits.shape[0]):
        lo, hi = starts[row], starts[row + 1]
        if lo == hi:
            continue
        ids = ids_all[lo:hi]
        if rep[row] != 1.0:
            score = logits[row, ids]
            logits[row, ids] = torch.where(score < 0, score * rep[row], score / rep[row])
        if freq[row] != 0.0:
            counts = torch.bincount(ids, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= freq[row] * counts / (hi - lo)


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


def sample(logits: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row. Returns (token ids [R] int64, their logprobs [R] float32)."""
    logits = logits.float()
    if s["penalty_ids"].numel():
        apply_penalties(logits, s)
    greedy = s["greedy"]
    next_ids = logits.argmax(-1)
    logprobs = torch.log_softmax(logits, -1)
    if not bool(greedy.all()):
        for row in torch.nonzero(~greedy).flatten().tolist():
            next_ids[row], logprobs[row] = _sample_row(logits[row], s, row)
    chosen = logprobs.gather(1, next_ids.view(-1, 1)).view(-1)
    return next_ids, chosen


def _sample_row(row_logits: torch.Tensor, s: dict[str, torch.Tensor], row: int):
    scores = warp(
        row_logits,
        float(s["temperature"][row]),
        int(s["top_k"][row]),
        float(s["top_p"][row]),
    )
    probs = scores.softmax(-1)
    gen = torch.Generator(device=probs.device).manual_seed(
        mix_seed(int(s["seeds"][row]), int(s["sample_index"][row]))
    )
    noise = torch.empty_like(probs).exponential_(generator=gen)
    token = torch.argmax(probs / noise)
    return token, torch.log_softmax(scores, -1)
