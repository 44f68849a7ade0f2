"""The layout of one forward step's tensors, written by the scheduler and read by the workers.

Tokens of all scheduled requests are flattened into one sequence of ``T`` tokens
(prefill chunks and decodes together); ``query_start`` delimits each request's tokens.
A negative id in ``input_ids`` or ``penalty_ids`` is a placeholder for the token the
previous step sampled in row ``-id - 1`` (see ``tgi_zmq.scheduler``): the worker fills it in.

Tensors (B requests, R of them sampling, T tokens):
- ``input_ids``, ``positions``, ``slot_mapping`` [T]: token, its position, its KV slot
  (``block * block_size + offset``).
- ``query_start`` [B+1], ``context_lens`` [B]: token ranges and KV length after the step.
- ``block_tables`` [B, max_blocks]: each request's pages, padded with 0.
- ``sample_seq`` [R]: which requests sample; the rest are the per-row sampling parameters,
  plus ``penalty_ids``/``penalty_start`` with the token history of rows that use penalties.

Encoder-decoder models (T5) add, for the ``Be`` requests whose encoder runs this step (``E`` tokens):
- ``encoder_ids``, ``encoder_slots`` [E]: the prompts and the cross-attention KV slots they fill;
  ``encoder_start`` [Be+1] delimits them;
- ``cross_lens`` [B], ``cross_tables`` [B, max_cross_blocks]: every request's encoder length and pages.
"""

from __future__ import annotations

import torch

from tgi_zmq.scheduler import ScheduledBatch


def build_step(batch: ScheduledBatch, block_size: int) -> dict[str, torch.Tensor]:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    context_lens = []
    for req, start, n in zip(batch.requests, batch.starts, batch.num_new, strict=True):
        input_ids.extend(req.token_ids[start : start + n])
        for pos in range(start, start + n):
            positions.append(pos)
            slots.append(req.blocks[pos // block_size] * block_size + pos % block_size)
        query_start.append(query_start[-1] + n)
        context_lens.append(start + n)
    max_blocks = max(len(r.blocks) for r in batch.requests)
    tables = [r.blocks + [0] * (max_blocks - len(r.blocks)) for r in batch.requests]
    tensors = {
        "input_ids": torch.tensor(input_ids, dtype=torch.int64),
        "positions": torch.tensor(positions, dtype=torch.int64),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64),
        "query_start": torch.tensor(query_start, dtype=torch.int32),
        "context_lens": torch.tensor(context_lens, dtype=torch.int32),
        "block_tables": torch.tensor(tables, dtype=torch.int32),
    }
    tensors.update(_sampling_tensors(batch))
    if batch.requests[0].encoder_ids:
        tensors.update(_encoder_tensors(batch, block_size))
    return tensors


def _encoder_tensors(batch: ScheduledBatch, block_size: int) -> dict[str, torch.Tensor]:
    ids: list[int] = []
    slots: list[int] = []
    start = [0]
    for req, encodes in zip(batch.requests, batch.encodes, strict=True):
        if encodes:
            ids.extend(req.encoder_ids)
            slots.extend(
                req.cross_blocks[p // block_size] * block_size + p % block_size
                for p in range(len(req.encoder_ids))
            )
            start.append(len(ids))
    max_blocks = max(len(r.cross_blocks) for r in batch.requests)
    tables = [r.cross_blocks + [0] * (max_blocks - len(r.cross_blocks)) for r in batch.requests]
    return {
        "encoder_ids": torch.tensor(ids, dtype=torch.int64),
        "encoder_slots": torch.tensor(slots, dtype=torch.int64),
        "encoder_start": torch.tensor(start, dtype=torch.int32),
        "cross_lens": torch.tensor([len(r.encoder_ids) for r in batch.requests], dtype=torch.int32),
        "cross_tables": torch.tensor(tables, dtype=torch.int32),
    }


def _sampling_tensors(batch: ScheduledBatch) -> dict[str, torch.Tensor]:
    rows = [i for i, samples in enumerate(batch.samples()) if samples]
    reqs = [batch.requests[i] for i in rows]
    slots = [batch.sample_slots[i] for i in rows]
    params = [r.params for r in reqs]
    penalty_ids: list[int] = []
    penalty_start = [0]
    for req, slot, p in zip(reqs, slots, params, strict=True):
        if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0:
            penalty_ids.extend(req.token_ids[:slot])
        penalty_start.append(len(penalty_ids))
    return {
        "sample_seq": torch.tensor(rows, dtype=torch.int64),
        "greedy": torch.tensor([not p.do_sample for p in params], dtype=torch.bool),
        "temperature": torch.tensor([p.temperature for p in params], dtype=torch.float32),
        "top_k": torch.tensor([p.top_k for p in params], dtype=torch.int64),
        "top_p": torch.tensor([p.top_p for p in params], dtype=torch.float32),
        "repetition_penalty": torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32),
        "frequency_penalty": torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32),
        "seeds": torch.tensor([_as_int64(p.seed or 0) for p in params], dtype=torch.int64),
        "sample_index": torch.tensor([slot - r.prompt_len for r, slot in zip(reqs, slots, strict=True)]),
        "penalty_ids": torch.tensor(penalty_ids, dtype=torch.int64),
        "penalty_start": torch.tensor(penalty_start, dtype=torch.int64),
    }


def _as_int64(value: int) -> int:
    """Seeds are uint64 on the API; reinterpret the bits as int64 for the tensor."""
    return ((value + 2**63) % 2**64) - 2**63
