"""What a worker builds from a step: the per-request state it keeps between steps (``RequestStates``)
and the model's view of one step (``ForwardBatch``), on the step's device.

The scheduler-side half of the contract (what a step carries) is ``tgi_zmq.step``; models read only
``ForwardBatch``.
"""

from __future__ import annotations

import dataclasses

import torch

from tgi_zmq.attention import AttentionMetadata
from tgi_zmq.step import Step


class RequestStates:
    """What the worker keeps per running request, one row per state row, on the step's device:
    page tables (and cross-attention page tables) and penalty token counts."""

    def __init__(self, rows: int, max_pages: int, vocab_size: int, device: torch.device):
        self.rows, self.vocab_size, self.device = rows, vocab_size, torch.device(device)
        self.pages = torch.zeros(rows, max_pages, dtype=torch.int64, device=self.device)
        self.cross_pages = torch.zeros(rows, max_pages, dtype=torch.int64, device=self.device)
        self._counts: torch.Tensor | None = None  # [rows, vocab] float32, made on first use
        self.history_lens = torch.zeros(rows, dtype=torch.float32, device=self.device)

    @property
    def counts(self) -> torch.Tensor:
        if self._counts is None:
            self._counts = torch.zeros(self.rows, self.vocab_size, dtype=torch.float32, device=self.device)
        return self._counts

    def apply(self, step: Step) -> None:
        """Take in the pages the step's requests got since their last step."""
        _scatter_pages(self.pages, step.inputs.new_pages)
        if step.encoder is not None:
            _scatter_pages(self.cross_pages, step.encoder.new_pages)

    def start_histories(self, step: Step, num_histories: int) -> None:
        """Penalty counts of the rows that send their token history this step start from it (the
        history's placeholders already filled). Sizes come from the host (``num_histories``, the
        ids' shape), so nothing is read back from the device."""
        if not num_histories:
            return
        s = step.sampling
        rows = step.inputs.state_rows[s.rows[s.history_rows]]
        lengths = s.history_start[1:] - s.history_start[:-1]
        owner = torch.repeat_interleave(
            torch.arange(num_histories, device=self.device), lengths, output_size=s.history_ids.shape[0]
        )
        counts = torch.zeros(num_histories, self.vocab_size, dtype=torch.float32, device=self.device)
        counts.index_put_(
            (owner, s.history_ids), torch.ones_like(owner, dtype=torch.float32), accumulate=True
        )
        self.counts[rows] = counts
        self.history_lens[rows] = lengths.float()

    def count_sampled(self, step: Step, next_ids: torch.Tensor) -> None:
        """Add each penalised row's sampled token to its counts (its history for the next step)."""
        s = step.sampling
        rows = step.inputs.state_rows[s.rows]
        weight = s.penalised.float()
        self.counts.index_put_((rows, next_ids), weight, accumulate=True)
        self.history_lens.index_add_(0, rows, weight)

    def tables(self, step: Step, width: int, cross: bool = False) -> torch.Tensor:
        """[B, width] page tables of the step's requests (``cross``: of their encoders): ``width`` pages
        hold the step's longest context (a host integer, so nothing is read back from the device)."""
        return (self.cross_pages if cross else self.pages)[step.inputs.state_rows, :width]


def _scatter_pages(table: torch.Tensor, updates: torch.Tensor) -> None:
    table[updates[:, 0], updates[:, 1]] = updates[:, 2]


@dataclasses.dataclass
class ForwardBatch:
    """What a model's forward reads, on its device: built by the worker from a step and its state."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: AttentionMetadata
    logit_rows: torch.Tensor  # [R] the flat token rows whose logits are returned
    encoder: EncoderBatch | None = None


@dataclasses.dataclass
class EncoderBatch:
    ids: torch.Tensor  # [E] prompts whose encoder runs now
    slots: torch.Tensor  # [E] their cross-attention KV slots
    start: list[int]  # [Be+1] host boundaries of the prompts
    cross_attention: AttentionMetadata  # every request's decoder queries over its encoder's pages
