"""The scheduler -> worker contract of one forward step: typed inputs, their transport layout, their size.

Tokens of all scheduled requests are flattened into one sequence of ``T`` tokens (prefill chunks
and decodes together); ``query_start`` delimits each request's tokens. A negative id in
``input_ids`` or a penalty history is a placeholder for the token the previous step sampled in
row ``-id - 1`` (see ``tgi_zmq.policy``): the worker fills it in.

A step carries what changed since the previous one, as vLLM v1's scheduler output does. What a
request needs every step but that changes slowly lives in the worker
(``tgi_zmq.forward_batch.RequestStates``), in the row of its state tables that the scheduler gave
the request while it runs (``Request.row``, a ``policy.RowState`` that also records what was sent):
- its page table (and its encoder's pages, T5): a step sends only the pages added since the last
  step, as ``(state row, page index, page id)`` triples, and the entries freed since behind a sliding
  window (``tgi_zmq.block_manager``), which become the null page;
- its penalty token counts: a penalised request's token history is sent once, in the first step
  that samples for it in its row; the worker then counts the tokens it samples itself;
- its grammar matcher (structured output, rank 0 only, which compiled the grammar when the request
  arrived): the grammar and the tokens generated so far are sent once, in the first step that samples
  for it in its row, and the row is named again when the request leaves it, so the matcher is dropped
  (``Step.grammars``, in the ``StepRequest`` message: a grammar's text is no tensor); each step flags
  the sampling rows that follow a grammar (``SamplingInputs.grammar``), and the worker fills their
  masks itself and advances their matchers with the tokens it samples, so no mask waits for the
  scheduler. Its answer flags the rows whose grammar is done (``StepOutput.grammar_done``).

Shapes (B requests, R of them sampling, T tokens): ``StepInputs`` [T] and [B]; ``SamplingInputs``
[R] (its per-row parameters packed by dtype, [k, R]); ``EncoderInputs`` for the requests whose
encoder runs this step. ``Step.to_tensors`` names them ``<part>.<field>`` for the transport
(``tgi_zmq.transport``), leaving out the empty fields most steps have; ``step_buffer_size`` bounds
their bytes (the grammars are not among them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from tgi_zmq.block_manager import ceil_div
from tgi_zmq.config import MAX_EOS_TOKEN_IDS, MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS
from tgi_zmq.messages import GrammarStart

if TYPE_CHECKING:
    from tgi_zmq.policy import Request, ScheduledBatch

PAGE_UPDATE = 3  # ints per page-table update: state row, page index, page id
MAX_BIAS_PER_ROW = MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS + MAX_EOS_TOKEN_IDS


def slot_of(pages: list[int], position: int, block_size: int) -> int:
    """The KV slot of ``position`` in a request's ``pages``: ``page * block_size + offset``."""
    return pages[position // block_size] * block_size + position % block_size


# ---------------------------------------------------------------------------------- the wire


@dataclasses.dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64; negative: a placeholder
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: the KV slot each token writes
    query_start: torch.Tensor  # [B+1] int32: request b's tokens are query_start[b]:query_start[b+1]
    context_lens: torch.Tensor  # [B] int32: KV length after the step
    state_rows: torch.Tensor  # [B] int64: each request's row in the worker's state tables
    new_pages: torch.Tensor  # [N, 3] int64: (state row, page index, page id) added since the last step


class Packed:
    """One named row of a packed ``[k, R]`` field: the per-row sampling parameters travel as three
    tensors (one per dtype), not eleven, and each name reads a contiguous view."""

    def __init__(self, field: str, index: int):
        self.field = field
        self.index = index

    def __get__(self, obj: object | None, owner: type | None = None) -> torch.Tensor | Packed:
        return self if obj is None else getattr(obj, self.field)[self.index]


@dataclasses.dataclass
class SamplingInputs:
    rows: torch.Tensor  # [R] int64: which requests (indices into the step's B) sample a token
    floats: torch.Tensor  # [5, R] float32: the ``Packed`` rows named below
    ints: torch.Tensor  # [4, R] int64
    flags: torch.Tensor  # [3, R] bool
    history_rows: torch.Tensor  # [H] int64: rows (of R) whose penalty counts start over this step
    history_ids: torch.Tensor  # [sum of lengths] int64: their token histories, back to back
    history_start: torch.Tensor  # [H+1] int64 (empty when H is 0)
    bias_rows: torch.Tensor  # [N] int64: sparse logit biases (``logit_bias``; -inf bans, ``min_tokens``)
    bias_ids: torch.Tensor  # [N] int64
    bias_values: torch.Tensor  # [N] float32
    prompt_rows: torch.Tensor  # [P] int64: flat token rows whose next prompt token is scored
    prompt_targets: torch.Tensor  # [P] int64: that next prompt token

    temperature = Packed("floats", 0)
    top_p = Packed("floats", 1)
    typical_p = Packed("floats", 2)
    repetition_penalty = Packed("floats", 3)
    frequency_penalty = Packed("floats", 4)
    top_k = Packed("ints", 0)  # 0: off
    seeds = Packed("ints", 1)
    sample_index = Packed("ints", 2)  # index of the token sampled among the request's outputs
    top_n = Packed("ints", 3)  # how many of the most likely tokens to return
    greedy = Packed("flags", 0)
    grammar = Packed("flags", 1)  # follows a grammar (its matcher lives in the worker's row)
    watermark = Packed("flags", 2)

    @property
    def penalised(self) -> torch.Tensor:
        """[R] bool: rows whose logits depend on their token counts."""
        return (self.repetition_penalty != 1.0) | (self.frequency_penalty != 0.0)


@dataclasses.dataclass
class EncoderInputs:
    """Encoder-decoder models (T5): the prompts whose encoder runs this step, and every request's
    cross-attention context (its encoder length; its pages live in the worker's state)."""

    ids: torch.Tensor  # [E] int64: the prompts, back to back
    slots: torch.Tensor  # [E] int64: the cross-attention KV slots they fill
    start: torch.Tensor  # [Be+1] int32: prompt boundaries in ``ids``
    lens: torch.Tensor  # [B] int32: each request's encoder length
    new_pages: torch.Tensor  # [N, 3] int64: cross-attention pages added since the last step


_PARTS = {"inputs": StepInputs, "sampling": SamplingInputs, "encoder": EncoderInputs}

# What most steps have none of (no page added, no penalty history, no bias, no scored prompt): left out
# of the transport when empty, and put back by ``Step.from_tensors`` (a decode step carries 10 tensors).
_EMPTY = {dtype: torch.empty(0, dtype=dtype) for dtype in (torch.int64, torch.int32, torch.float32)}
_ABSENT_WHEN_EMPTY = {
    "inputs.new_pages": _EMPTY[torch.int64].view(0, PAGE_UPDATE),
    **{
        f"sampling.{name}": _EMPTY[torch.int64]
        for name in ("history_rows", "history_ids", "history_start", "bias_rows", "bias_ids")
    },
    "sampling.bias_values": _EMPTY[torch.float32],
    "sampling.prompt_rows": _EMPTY[torch.int64],
    "sampling.prompt_targets": _EMPTY[torch.int64],
}


@dataclasses.dataclass
class Step:
    inputs: StepInputs
    sampling: SamplingInputs
    encoder: EncoderInputs | None = None
    grammars: list[GrammarStart] = dataclasses.field(default_factory=list)  # not tensors: in the message

    def fields(self) -> dict[str, torch.Tensor]:
        """Every tensor of the step by its flat ``<part>.<field>`` name."""
        out = {}
        for part in _PARTS:
            value = getattr(self, part)
            if value is not None:
                out.update({f"{part}.{f.name}": getattr(value, f.name) for f in dataclasses.fields(value)})
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the transport writes: every field but the empty ones it may leave out."""
        return {k: t for k, t in self.fields().items() if t.numel() or k not in _ABSENT_WHEN_EMPTY}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], grammars: Iterable[GrammarStart] = ()) -> Step:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in {**_ABSENT_WHEN_EMPTY, **tensors}.items():
            part, _, field = name.partition(".")
            if part not in _PARTS:
                raise ValueError(f"unknown step tensor {name!r}")
            parts.setdefault(part, {})[field] = tensor
        built = {part: _PARTS[part](**fields) for part, fields in parts.items()}
        return cls(**built, grammars=list(grammars))

    def to(self, device: torch.device) -> Step:
        if device.type == "cpu":  # the transport's views already live there
            return self
        tensors = {k: t.to(device, non_blocking=True) for k, t in self.fields().items()}
        return Step.from_tensors(tensors, self.grammars)

    def layout(self) -> StepLayout:
        """The host-side numbers the worker plans with (read before the tensors go to the device)."""
        enc, s = self.encoder, self.sampling
        sample_rows, state_rows = s.rows.tolist(), self.inputs.state_rows.tolist()
        temperature, top_p, typical_p, repetition, frequency = s.floats.tolist()
        top_k, seeds, sample_index, top_n = s.ints.tolist()
        greedy, grammar, watermark = s.flags.tolist()
        draws = [
            Draw(row, temperature[row], top_k[row], top_p[row], typical_p[row], seeds[row], sample_index[row])
            for row in range(len(sample_rows))
            if not greedy[row]
        ]
        return StepLayout(
            query_start=self.inputs.query_start.tolist(),
            context_lens=self.inputs.context_lens.tolist(),
            sample_rows=sample_rows,
            draws=draws,
            penalised=any(r != 1.0 or f != 0.0 for r, f in zip(repetition, frequency, strict=True)),
            grammar_rows=[(row, state_rows[sample_rows[row]]) for row in _true_rows(grammar)],
            num_histories=len(s.history_rows),
            top_n=max(top_n, default=0),
            watermarked=_true_rows(watermark),
            biased=len(s.bias_rows) > 0,
            num_prompt_rows=len(s.prompt_rows),
            encoder_start=enc.start.tolist() if enc is not None else [],
            encoder_lens=enc.lens.tolist() if enc is not None else [],
        )


@dataclasses.dataclass(frozen=True)
class Draw:
    """The host-side parameters of one row that samples at random."""

    row: int
    temperature: float
    top_k: int
    top_p: float
    typical_p: float
    seed: int
    index: int  # the token's index among the request's outputs


@dataclasses.dataclass
class StepLayout:
    """A step's shape as host integers: the attention plan and the sampler's branches are made from
    these, so the forward never reads a device tensor back (no host synchronisation)."""

    query_start: list[int]
    context_lens: list[int]
    sample_rows: list[int]  # requests that sample
    draws: list[Draw]  # rows (of R) that sample at random; the others are greedy
    penalised: bool  # some row applies penalties
    grammar_rows: list[tuple[int, int]]  # (row of R, its state row) of the rows that follow a grammar
    num_histories: int  # rows whose penalty counts start over
    top_n: int  # the most top tokens a row asks for
    watermarked: list[int]  # rows (of R) with the watermark
    biased: bool  # some row has logit biases
    num_prompt_rows: int  # prompt tokens scored (``prompt_logprobs``)
    encoder_start: list[int]
    encoder_lens: list[int]


@dataclasses.dataclass
class StepOutput:
    """What a step sends back (rank 0's; other ranks hold only ``next_ids``)."""

    next_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor  # [R] float32
    top_ids: torch.Tensor  # [R, top_n] int64
    top_logprobs: torch.Tensor  # [R, top_n] float32
    prompt_logprobs: torch.Tensor  # [P] float32: of each scored prompt token
    failed: torch.Tensor  # [R] bool: the row could not sample (its request fails alone; ignore its token)
    grammar_done: torch.Tensor  # [R] bool: the row's grammar allows nothing after its token

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Every field but the empty ones most steps have (no top tokens, no scored prompt)."""
        fields = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return {name: t for name, t in fields if t.numel() or name not in _OUTPUTS_ABSENT_WHEN_EMPTY}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> StepOutput:
        rows = len(tensors["next_ids"])
        absent = {
            "top_ids": torch.empty(rows, 0, dtype=torch.int64),
            "top_logprobs": torch.empty(rows, 0),
            "prompt_logprobs": torch.empty(0),
        }
        return cls(**{**absent, **tensors})


_OUTPUTS_ABSENT_WHEN_EMPTY = frozenset(("top_ids", "top_logprobs", "prompt_logprobs"))


def step_buffer_size(max_step_tokens: int, max_rows: int, max_total_tokens: int, block_size: int) -> int:
    """Bytes one step's tensors can need at most.

    Per token 3 int64 (+ an encoder's 2, + 2 for a scored prompt token); per request 4+4+8 bytes and
    its page updates; per sampling row 16 fields of 8 bytes at most and its logit biases; penalty
    histories are sent once per request, bounded by every row starting over in one step (after a
    worker restart, say). Grammars travel in the step's message, not in this buffer.
    """
    max_pages = ceil_div(max_total_tokens, block_size) + 1
    return (
        7 * 8 * (max_step_tokens + max_rows)
        + (16 + 2 * 8 * PAGE_UPDATE * max_pages) * max_rows
        + 8 * 16 * max_rows
        + 8 * max_rows * max_total_tokens
        + 20 * max_rows * MAX_BIAS_PER_ROW
        + (1 << 16)
    )


def result_buffer_size(max_rows: int, max_top_n: int, max_step_tokens: int) -> int:
    """Bytes one step's ``StepOutput`` can need at most: per sampling row its id (8), logprob (4), two
    flags (1 each) and ``max_top_n`` top tokens (8 + 4 each); one logprob (4) per scored prompt token, at most
    the step's tokens; each tensor 64-byte aligned in the buffer."""
    per_row = 8 + 4 + 2 + 12 * max_top_n
    return max_rows * per_row + 4 * max_step_tokens + 64 * len(dataclasses.fields(StepOutput)) + (1 << 12)


# ---------------------------------------------------------------------------------- building


def build_step(batch: ScheduledBatch, block_size: int, eos_token_ids: tuple[int, ...] = ()) -> Step:
    """The step of ``batch``; marks the pages and histories it sends as known to the workers.
    ``eos_token_ids`` are banned for rows still short of their ``min_tokens``."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    for req, start, n in zip(batch.requests, batch.starts, batch.num_new, strict=True):
        input_ids.extend(req.token_ids[start : start + n])
        positions.extend(range(start, start + n))
        slots.extend(slot_of(req.blocks, pos, block_size) for pos in range(start, start + n))
        query_start.append(query_start[-1] + n)
    inputs = StepInputs(
        input_ids=_ints(input_ids),
        positions=_ints(positions),
        slot_mapping=_ints(slots),
        query_start=_ints(query_start, torch.int32),
        context_lens=_ints([s + n for s, n in zip(batch.starts, batch.num_new, strict=True)], torch.int32),
        state_rows=_ints([r.row.index for r in batch.requests]),
        new_pages=_pages(
            _freed_pages(batch.requests) + _page_updates(batch.requests, "blocks", "pages_sent")
        ),
    )
    encoder = _encoder_inputs(batch, block_size) if batch.requests[0].encoder_ids else None
    sampling = _sampling_inputs(batch, eos_token_ids[:MAX_EOS_TOKEN_IDS])
    sampling.prompt_rows, sampling.prompt_targets = _scored_prompt(batch, query_start)
    return Step(
        inputs,
        sampling,
        encoder,
        _grammar_starts(batch),
    )


def _scored_prompt(batch: ScheduledBatch, query_start: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat rows whose next prompt token is scored, and those tokens (``prompt_logprobs``)."""
    rows: list[int] = []
    targets: list[int] = []
    for i, position, count in batch.scored_prompt():
        first = query_start[i] + position - batch.starts[i]
        rows.extend(range(first, first + count))
        targets.extend(batch.requests[i].token_ids[position + 1 : position + 1 + count])
    return _ints(rows), _ints(targets)


def _page_updates(requests: list[Request], pages: str, sent: str) -> list[int]:
    """The pages (``Request.<pages>``) added since the workers last got them (``RowState.<sent>``)."""
    updates: list[int] = []
    for req in requests:
        ids, known = getattr(req, pages), getattr(req.row, sent)
        for index in range(known, len(ids)):
            updates += (req.row.index, index, ids[index])
        setattr(req.row, sent, len(ids))
    return updates


def _pages(updates: list[int]) -> torch.Tensor:
    return _ints(updates).view(-1, PAGE_UPDATE)


def _freed_pages(requests: list[Request]) -> list[int]:
    """The null page for each entry the workers hold that was freed since (``Request.freed_blocks``):
    no page table keeps a page that another request may get."""
    updates: list[int] = []
    for req in requests:
        row = req.row
        for index in range(row.freed_sent, min(req.freed_blocks, row.pages_sent)):
            updates += (row.index, index, req.blocks[index])
        row.freed_sent = req.freed_blocks
    return updates


def _encoder_inputs(batch: ScheduledBatch, block_size: int) -> EncoderInputs:
    ids: list[int] = []
    slots: list[int] = []
    start = [0]
    for req, encodes in zip(batch.requests, batch.encodes, strict=True):
        if encodes:
            ids.extend(req.encoder_ids)
            slots.extend(slot_of(req.cross_blocks, p, block_size) for p in range(len(req.encoder_ids)))
            start.append(len(ids))
    return EncoderInputs(
        ids=_ints(ids),
        slots=_ints(slots),
        start=_ints(start, torch.int32),
        lens=_ints([len(r.encoder_ids) for r in batch.requests], torch.int32),
        new_pages=_pages(_page_updates(batch.requests, "cross_blocks", "cross_pages_sent")),
    )


def _sampling_inputs(batch: ScheduledBatch, eos_token_ids: tuple[int, ...]) -> SamplingInputs:
    rows = [i for i, slot in enumerate(batch.sample_slots) if slot >= 0]
    reqs = [batch.requests[i] for i in rows]
    slots = [batch.sample_slots[i] for i in rows]
    params = [r.params for r in reqs]
    history_rows: list[int] = []
    history_ids: list[int] = []
    history_start = [0]
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_values: list[float] = []
    for row, (req, slot) in enumerate(zip(reqs, slots, strict=True)):
        for token, value in _biases(req, slot, eos_token_ids):
            bias_rows.append(row)
            bias_ids.append(token)
            bias_values.append(value)
        if req.params.penalised and not req.row.history_sent:
            history_rows.append(row)
            history_ids.extend(req.token_ids[:slot])
            history_start.append(len(history_ids))
            req.row.history_sent = True
    return SamplingInputs(
        rows=_ints(rows),
        floats=torch.tensor(
            [
                [p.temperature for p in params],
                [p.top_p for p in params],
                [p.typical_p for p in params],
                [p.repetition_penalty for p in params],
                [p.frequency_penalty for p in params],
            ],
            dtype=torch.float32,
        ),
        ints=torch.tensor(
            [
                [p.top_k for p in params],
                [_as_int64(p.seed or 0) for p in params],
                [slot - r.prompt_len for r, slot in zip(reqs, slots, strict=True)],
                [p.top_n_tokens for p in params],
            ],
            dtype=torch.int64,
        ),
        flags=torch.tensor(
            [
                [not p.do_sample for p in params],
                [p.grammar is not None for p in params],
                [p.watermark for p in params],
            ],
            dtype=torch.bool,
        ),
        history_rows=_ints(history_rows),
        history_ids=_ints(history_ids),
        history_start=_ints(history_start if history_rows else []),
        bias_rows=_ints(bias_rows),
        bias_ids=_ints(bias_ids),
        bias_values=torch.tensor(bias_values, dtype=torch.float32) if bias_values else _EMPTY[torch.float32],
        prompt_rows=_ints([]),  # set by ``build_step``
        prompt_targets=_ints([]),
    )


def _biases(req: Request, slot: int, eos_token_ids: tuple[int, ...]) -> list[tuple[int, float]]:
    """A row's logit biases: the client's, and a ban on the tokens that would end it too soon."""
    p = req.params
    biases = [(b.token, b.bias) for b in p.logit_bias]
    if slot - req.prompt_len < p.min_tokens:
        biases += [(token, float("-inf")) for token in (*eos_token_ids, *p.stop_token_ids)]
    return biases


def _grammar_starts(batch: ScheduledBatch) -> list[GrammarStart]:
    """The grammars of the rows that sample for the first time in their state row; marks them sent.

    The tokens before the sampled one are all real: a request enters its row with none of its
    placeholders left (``policy._drop_placeholders``) and samples nothing until this step.
    """
    starts = []
    for req, slot in zip(batch.requests, batch.sample_slots, strict=True):
        if slot >= 0 and req.params.grammar is not None and not req.row.grammar_sent:
            starts.append(
                GrammarStart(req.rid, req.row.index, req.params.grammar, req.token_ids[req.prompt_len : slot])
            )
            req.row.grammar_sent = True
    return starts


def _true_rows(flags: list[bool]) -> list[int]:
    return [row for row, on in enumerate(flags) if on]


def _ints(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    if not values:  # most of a decode step's fields: one shared empty tensor (no element to write)
        return _EMPTY[dtype]
    return torch.tensor(values, dtype=dtype)


def _as_int64(value: int) -> int:
    """Seeds are uint64 on the API; reinterpret the bits as int64 for the tensor."""
    return ((value + 2**63) % 2**64) - 2**63
