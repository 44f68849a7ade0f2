"""Runs one step's tensors through the model and the sampler (what a worker does per step)."""

from __future__ import annotations

import torch

from tgi_zmq.attention import AttentionMetadata
from tgi_zmq.models import load_model
from tgi_zmq.parallel import Shard
from tgi_zmq.sampler import sample


class ModelRunner:
    def __init__(
        self,
        model_id: str,
        dtype: str,
        device: str,
        num_blocks: int,
        block_size: int,
        shard: Shard | None = None,
    ):
        self.device = torch.device(device)
        self.shard = shard or Shard()
        self.model = load_model(model_id, dtype, device, self.shard)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.cache = self.model.new_cache(num_blocks, block_size)
        self.forget_samples()

    @torch.inference_mode()
    def execute(self, step: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward the step and sample; returns ``next_ids`` [R] and ``logprobs`` [R].

        With tensor parallelism rank 0 samples and sends the ids to the other ranks (they need
        them to fill the next step's placeholders); their ``logprobs`` are zeros.
        """
        step = {name: t.to(self.device, non_blocking=True) for name, t in step.items()}
        for name in ("input_ids", "penalty_ids"):
            step[name] = self._fill_placeholders(step[name])
        meta = AttentionMetadata.build(step, self.block_size)
        logit_rows = step["query_start"][1:][step["sample_seq"]].long() - 1
        logits = self.model.forward(step, self.cache, meta, logit_rows)
        if logits is not None:
            next_ids, logprobs = sample(logits, step)
        else:
            next_ids = torch.empty(len(step["sample_seq"]), dtype=torch.int64, device=self.device)
            logprobs = torch.zeros(len(next_ids), device=self.device)
        if self.shard.world > 1:
            self.shard.broadcast(next_ids)
        if next_ids.numel():
            self.prev_ids = next_ids
        return {"next_ids": next_ids, "logprobs": logprobs.float()}

    def forget_samples(self) -> None:
        """Drop the last step's samples (a new scheduler's steps never refer to them)."""
        self.prev_ids = torch.zeros(1, dtype=torch.int64, device=self.device)

    def _fill_placeholders(self, ids: torch.Tensor) -> torch.Tensor:
        """Replace ``-(1 + row)`` by the token sampled for ``row`` in the previous step."""
        rows = (-ids - 1).clamp(0, self.prev_ids.numel() - 1)
        return torch.where(ids < 0, self.prev_ids[rows], ids)
