"""One step on a worker: take in the step's state changes, forward, then sample.

``forward`` returns the logits of the rows that sample; ``sample`` applies the logits processors
(the hook: a vocabulary mask, a logit bias), the penalties from the per-request token counts kept
here, and the sampler. Both run on the step's device from host integers (``StepLayout``).

Overlap and masks that depend on the previous token. With the overlap schedule the scheduler
builds step N+1 before it knows the tokens of step N, so it cannot compute a grammar's mask for
N+1; the worker that samples (rank 0) can, since it sampled N's tokens itself. So the masks are
made here (as SGLang resolves the previous step's tokens on its forward thread): rank 0 keeps a
grammar matcher per state row (``tgi_zmq.grammar.RowMatchers``; the grammars were compiled when
their requests arrived), started by the step that first samples for a request in its row
(``Step.grammars``) and dropped once it left the row (a ``GrammarDropRequest`` between steps).
Per step: forward (on CUDA launched asynchronously, so the host fills the masks while it runs) ->
fill the grammar rows' bitmasks -> sample with them as a ``VocabMask`` on the step's device -> the
matchers take the sampled tokens (a host read: one synchronisation on CUDA, only in steps with
grammar rows) and say which grammars are done. Steps without grammar rows do none of this, and the
engine keeps its overlap depth either way.

One bad row fails that row, not its step (the error policy, ``tgi_zmq.runtime``): a row with a logit
bias on a token the model does not have, or one whose mask, sampling or matcher raises, is flagged in
``StepOutput.failed`` (the engine fails its request) and the others get their tokens. When sampling
the batch raises, each row is sampled alone to find the rows that fail. A failed forward pass, shared
by every row, fails the step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future

import torch

from tgi_zmq.attention import AttentionMetadata
from tgi_zmq.block_manager import ceil_div
from tgi_zmq.forward_batch import EncoderBatch, ForwardBatch, RequestStates
from tgi_zmq.grammar import EngineLoader, GrammarEngine, RowMatchers, unpack
from tgi_zmq.models import load_model
from tgi_zmq.parallel import Shard
from tgi_zmq.sampler import LogitBias, LogitsProcessor, SamplingMetadata, VocabMask, Watermark, sample
from tgi_zmq.step import Step, StepLayout, StepOutput

log = logging.getLogger("tgi_zmq.model_runner")


class ModelRunner:
    def __init__(
        self,
        model_id: str,
        dtype: str,
        device: str,
        num_blocks: int,
        block_size: int,
        shard: Shard | None = None,
        max_rows: int = 128,
        max_total_tokens: int = 4096,
        watermark: Watermark = Watermark(),
        grammars: GrammarEngine | Future[GrammarEngine] | EngineLoader | None = None,
        quantize: str | None = None,
        kv_cache_dtype: str | None = None,
    ):
        self.device = torch.device(device)
        self.shard = shard or Shard()
        self.model = load_model(model_id, dtype, device, self.shard, quantize, kv_cache_dtype)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.cache = self.model.new_cache(num_blocks, block_size)
        self.invariant = self.model.invariant_steps()
        self.max_rows = max_rows
        self.max_pages = ceil_div(max_total_tokens, block_size) + 1
        self.watermark = watermark
        self.grammars = RowMatchers(grammars)  # structured output: rank 0's (``grammar.load_engine``)
        self.sample_seconds = 0.0  # the last step's, after its forward (``tgi_batch_decode_duration``)
        self.forget_requests()

    def forget_requests(self) -> None:
        """Drop the per-request state and the last step's samples (a new scheduler starts afresh; the
        compiled grammars stay)."""
        self.states = RequestStates(self.max_rows, self.max_pages, self.model.cfg.vocab_size, self.device)
        self.prev_ids = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.grammars.forget()

    @torch.inference_mode()
    def execute(self, step: Step, processors: Sequence[LogitsProcessor] = ()) -> StepOutput:
        """Forward and sample one step (its tensors on any device; they are moved to ours).

        With tensor parallelism rank 0 samples and sends the ids to the other ranks (they need
        them to fill the next step's placeholders and count penalised tokens).
        """
        layout = step.layout()
        step = step.to(self.device)
        logits = self.forward(step, layout)
        started = time.perf_counter()  # on a GPU the forward may still run: sampling waits for it
        out = self.sample(step, layout, logits, processors)
        self.sample_seconds = time.perf_counter() - started
        return out

    @torch.inference_mode()
    def forward(self, step: Step, layout: StepLayout) -> torch.Tensor | None:
        """Take in the step's state changes and run the model: logits [R + P, vocab] of the sampling
        rows, then of the scored prompt rows (None off rank 0)."""
        step.inputs.input_ids = self._fill_placeholders(step.inputs.input_ids)
        if layout.num_histories:
            step.sampling.history_ids = self._fill_placeholders(step.sampling.history_ids)
        self.states.apply(step)
        self.states.start_histories(step, layout.num_histories)
        return self.model.forward(self.forward_batch(step, layout), self.cache)

    @torch.inference_mode()
    def sample(
        self,
        step: Step,
        layout: StepLayout,
        logits: torch.Tensor | None,
        processors: Sequence[LogitsProcessor] = (),
    ) -> StepOutput:
        rows = len(layout.sample_rows)
        if logits is None:
            out = StepOutput(*_empty_output(rows, layout, self.device))
        else:
            self.grammars.start(step.grammars)
            out = self._choose(step, layout, logits[:rows], list(processors))
            out.prompt_logprobs = _prompt_logprobs(logits[rows:], step.sampling.prompt_targets)
            if layout.grammar_rows:
                self._advance_grammars(layout, out)
        if self.shard.world > 1:
            self.shard.broadcast(out.next_ids)
        if layout.penalised:
            self.states.count_sampled(step, out.next_ids)
        if rows:
            self.prev_ids = out.next_ids
        return out

    def _choose(
        self, step: Step, layout: StepLayout, logits: torch.Tensor, processors: list[LogitsProcessor]
    ) -> StepOutput:
        """Sample every row at once; if that raises, each row alone: a row that raises again fails
        alone (flagged, its token 0) and the others get their tokens."""
        try:
            return self._choose_rows(step, layout, logits, processors)
        except Exception:
            log.exception("sampling a step's %d rows failed: sampling each alone", len(logits))
        top_n = min(layout.top_n, logits.shape[-1])
        out = StepOutput(*_empty_output(len(logits), layout, self.device, top_n))
        out.next_ids.zero_()
        out.failed.fill_(True)
        for row in range(len(logits)):
            try:
                one = self._choose_rows(step, layout, logits, processors, [row])
            except Exception:
                log.exception("row %d cannot sample: its request fails alone", row)
                continue
            for name in ("next_ids", "logprobs", "top_ids", "top_logprobs", "failed"):
                getattr(out, name)[row] = getattr(one, name)[0]
        return out

    def _choose_rows(
        self,
        step: Step,
        layout: StepLayout,
        logits: torch.Tensor,
        processors: list[LogitsProcessor],
        rows: list[int] | None = None,
    ) -> StepOutput:
        """Sample the step's rows, or only ``rows`` (of R, in that order: the output has theirs)."""
        s = step.sampling
        meta = self._sampling_metadata(step, layout)
        processors = list(processors)
        bias = LogitBias(s.bias_rows, s.bias_ids, s.bias_values) if layout.biased else None
        grammar_rows = layout.grammar_rows
        if rows is not None:
            logits, meta = logits[rows], meta.select(rows)
            processors = [p.select(rows) for p in processors]
            bias = None if bias is None else bias.select(rows)
            position = {row: i for i, row in enumerate(rows)}
            grammar_rows = [(position[row], state) for row, state in grammar_rows if row in position]
        unknown = torch.zeros(len(logits), dtype=torch.bool, device=self.device)
        if bias is not None:
            unknown = bias.unknown_rows(len(logits), logits.shape[-1])
            processors.append(bias)
        if grammar_rows:
            processors.append(self._grammar_mask(step, grammar_rows, len(logits), logits.shape[-1]))
        sampled = sample(logits, meta, processors)
        return StepOutput(
            sampled.ids,
            sampled.logprobs,
            sampled.top_ids,
            sampled.top_logprobs,
            None,
            unknown,
            _no_rows(len(logits), self.device),
        )

    def _grammar_mask(
        self, step: Step, rows: list[tuple[int, int]], num_rows: int, vocab_size: int
    ) -> VocabMask:
        """The allowed tokens of ``rows`` (row, state row), filled on the host (while the forward runs
        on CUDA)."""
        bitmask = self.grammars.masks(rows, num_rows, vocab_size)
        return VocabMask(unpack(bitmask.to(self.device, non_blocking=True), vocab_size))

    def _advance_grammars(self, layout: StepLayout, out: StepOutput) -> None:
        """Each grammar row's matcher takes its sampled token (a host read) and says whether its grammar
        is done; one that raises fails its row alone."""
        failed, tokens = out.failed.tolist(), out.next_ids.tolist()
        done = [False] * len(tokens)
        for row, state_row in layout.grammar_rows:
            if failed[row]:
                continue
            try:
                done[row] = self.grammars.advance(state_row, tokens[row])
            except Exception:
                log.exception("row %d: its grammar cannot take the sampled token: it fails alone", row)
                failed[row] = True
        out.failed = torch.tensor(failed, dtype=torch.bool, device=self.device)
        out.grammar_done = torch.tensor(done, dtype=torch.bool, device=self.device)

    def forward_batch(self, step: Step, layout: StepLayout) -> ForwardBatch:
        """The model's view of a step whose state changes are taken in."""
        qs = layout.query_start
        inputs = step.inputs
        tables = self.states.tables(step, ceil_div(max(layout.context_lens), self.block_size))
        attention = AttentionMetadata.for_pages(
            qs, layout.context_lens, tables, inputs.slot_mapping, self.block_size, invariant=self.invariant
        )
        logit_rows = torch.tensor(
            [qs[r + 1] - 1 for r in layout.sample_rows], dtype=torch.int64, device=self.device
        )
        if layout.num_prompt_rows:
            logit_rows = torch.cat([logit_rows, step.sampling.prompt_rows])
        encoder = None
        if step.encoder is not None:
            width = ceil_div(max(layout.encoder_lens), self.block_size)
            cross_tables = self.states.tables(step, width, cross=True)
            cross = AttentionMetadata.for_pages(
                qs, layout.encoder_lens, cross_tables, None, self.block_size, causal=False
            )
            encoder = EncoderBatch(step.encoder.ids, step.encoder.slots, layout.encoder_start, cross)
        return ForwardBatch(inputs.input_ids, inputs.positions, attention, logit_rows, encoder)

    def _sampling_metadata(self, step: Step, layout: StepLayout) -> SamplingMetadata:
        s = step.sampling
        counts = lens = None
        if layout.penalised:
            rows = step.inputs.state_rows[s.rows]
            counts, lens = self.states.counts[rows], self.states.history_lens[rows]
        watermarked = []
        if layout.watermarked:  # the previous token seeds the green list: read back only for these rows
            qs = layout.query_start
            last = [qs[layout.sample_rows[row] + 1] - 1 for row in layout.watermarked]
            previous = step.inputs.input_ids[last].tolist()
            watermarked = list(zip(layout.watermarked, previous, strict=True))
        return SamplingMetadata(
            s.repetition_penalty,
            s.frequency_penalty,
            counts,
            lens,
            layout.draws,
            top_n=layout.top_n,
            watermarked=watermarked,
            watermark=self.watermark,
        )

    def _fill_placeholders(self, ids: torch.Tensor) -> torch.Tensor:
        """Replace ``-(1 + row)`` by the token sampled for ``row`` in the previous step."""
        rows = (-ids - 1).clamp(0, self.prev_ids.numel() - 1)
        return torch.where(ids < 0, self.prev_ids[rows], ids)


def _prompt_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The logprob of each scored prompt token under the model (no sampling parameters apply)."""
    if not len(targets):
        return torch.zeros(0, device=logits.device)
    return logits.float().log_softmax(-1).gather(1, targets.view(-1, 1)).view(-1)


def _empty_output(
    rows: int, layout: StepLayout, device: torch.device, top_n: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Ranks other than 0 do not sample: room for the ids rank 0 broadcasts, zeros elsewhere."""
    top_n = layout.top_n if top_n is None else top_n
    return (
        torch.empty(rows, dtype=torch.int64, device=device),
        torch.zeros(rows, device=device),
        torch.zeros(rows, top_n, dtype=torch.int64, device=device),
        torch.zeros(rows, top_n, device=device),
        torch.zeros(layout.num_prompt_rows, device=device),
        _no_rows(rows, device),
        _no_rows(rows, device),
    )


def _no_rows(rows: int, device: torch.device) -> torch.Tensor:
    """A per-row flag (``failed``, ``grammar_done``) down for every row."""
    return torch.zeros(rows, dtype=torch.bool, device=device)
