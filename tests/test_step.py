"""The typed step: its transport round trip, and the worker-side state it keeps in step with the policy
(page tables and penalty counts are sent as changes, not resent every step)."""

from __future__ import annotations

import random

import torch

from tgi_zmq.block_manager import BlockManager
from tgi_zmq.forward_batch import RequestStates
from tgi_zmq.messages import Grammar, SamplingParams
from tgi_zmq.policy import Request, SchedulePolicy
from tgi_zmq.step import Step, StepOutput, build_step, step_buffer_size

VOCAB = 64
PENALISED = SamplingParams(repetition_penalty=1.3)


def policy(num_blocks: int = 64, block_size: int = 4, max_running: int = 8) -> SchedulePolicy:
    return SchedulePolicy(BlockManager(num_blocks, block_size), 16, max_running, (), 400)


def nbytes(step: Step) -> int:
    return sum(t.numel() * t.element_size() for t in step.to_tensors().values())


def test_round_trip_through_the_transport_names():
    sched = policy()
    sched.add(Request("a", list(range(1, 11)), PENALISED, 4))
    step = build_step(sched.schedule(), 4)
    tensors = step.to_tensors()
    assert "inputs.input_ids" in tensors and "sampling.history_ids" in tensors and step.encoder is None
    again = Step.from_tensors(tensors)
    assert all(torch.equal(a, b) for a, b in zip(again.to_tensors().values(), tensors.values(), strict=True))


def test_a_decode_step_leaves_its_empty_fields_off_the_wire_and_gets_them_back():
    """A greedy decode step carries 10 tensors (its per-row parameters packed by dtype); what it has none
    of comes back empty with its dtype and shape, and the parameters read by name as before."""
    sched = SchedulePolicy(BlockManager(64, 16), 64, 8, (), 400)  # no page added by the decode step
    drawn = SamplingParams(do_sample=True, temperature=0.5, top_k=7, seed=3)
    sched.add(Request("a", list(range(1, 11)), drawn, 8))
    sched.add(Request("b", list(range(1, 6)), SamplingParams(), 8))
    batch = sched.schedule()
    assert "inputs.new_pages" in build_step(batch, 16).to_tensors()  # the prompts' pages
    sched.update(batch, [5, 6], [0.0, 0.0])
    tensors = build_step(sched.schedule(), 16).to_tensors()
    assert sorted(tensors) == sorted(
        [f"inputs.{f}" for f in ("input_ids", "positions", "slot_mapping", "query_start", "context_lens")]
        + ["inputs.state_rows"]
        + [f"sampling.{f}" for f in ("rows", "floats", "ints", "flags")]
    )
    step = Step.from_tensors(tensors)
    assert step.inputs.new_pages.shape == (0, 3) and step.sampling.bias_values.dtype == torch.float32
    assert step.sampling.history_start.numel() == 0 and step.sampling.prompt_rows.dtype == torch.int64
    s = step.sampling
    assert s.temperature.tolist() == [0.5, 1.0] and s.top_k.tolist() == [7, 0] and s.seeds.tolist() == [3, 0]
    assert s.greedy.tolist() == [False, True] and s.sample_index.tolist() == [1, 1]
    assert [d.row for d in step.layout().draws] == [0]


def test_a_step_outputs_empty_top_tokens_stay_off_the_wire_and_come_back_with_their_shape():
    out = StepOutput(
        torch.tensor([4, 5]),
        torch.zeros(2),
        torch.zeros(2, 0, dtype=torch.int64),
        torch.zeros(2, 0),
        torch.zeros(0),
        torch.zeros(2, dtype=torch.bool),
        torch.zeros(2, dtype=torch.bool),
    )
    tensors = out.to_tensors()
    assert sorted(tensors) == ["failed", "grammar_done", "logprobs", "next_ids"]
    again = StepOutput.from_tensors(tensors)
    assert again.top_ids.shape == (2, 0) and again.top_ids.dtype == torch.int64
    assert again.top_logprobs.shape == (2, 0) and again.prompt_logprobs.shape == (0,)


def test_pages_and_histories_go_once():
    sched = policy()
    req = Request("a", list(range(1, 11)), PENALISED, 20)
    sched.add(req)
    first = build_step(sched.schedule(), 4)
    assert first.inputs.new_pages.tolist() == [[req.row.index, i, page] for i, page in enumerate(req.blocks)]
    assert first.sampling.history_ids.tolist() == list(range(1, 11))
    sent = []
    for token in range(20, 26):
        batch = sched.schedule()
        step = build_step(batch, 4)
        sent.append(step.inputs.new_pages.tolist())
        assert step.sampling.history_ids.numel() == 0  # the worker counts the tokens it samples
        sched.update(batch, [token], [0.0])
    # the loop's steps run positions 10..15 (the first one the prefill's sampled token, as with overlap):
    # one new page, at position 12
    assert [len(s) for s in sent] == [0, 0, 1, 0, 0, 0]


def test_a_decode_step_at_context_4000_carries_kilobytes_not_the_context():
    sched = SchedulePolicy(BlockManager(5000, 16), 512, 16, (), 8192)
    reqs = [Request(f"r{i}", [1 + i] * 4000, PENALISED, 1000) for i in range(16)]
    for req in reqs:
        sched.add(req)
    while any(r.num_computed < 4000 for r in reqs):
        batch = sched.schedule()
        build_step(batch, 16)
        sched.update(batch, [5] * batch.num_samples, [0.0] * batch.num_samples)
    batch = sched.schedule()
    assert batch.is_decode and len(batch.requests) == 16
    assert nbytes(build_step(batch, 16)) < 4096


def test_the_buffer_bound_holds_a_worst_step():
    sched = SchedulePolicy(BlockManager(600, 16), 512, 16, (), 512)
    for i in range(16):
        sched.add(Request(f"r{i}", [3] * 32, PENALISED, 400))
    biggest = 0
    while sched.has_work():
        batch = sched.schedule()
        biggest = max(biggest, nbytes(build_step(batch, 16)))
        sched.update(batch, [5] * batch.num_samples, [0.0] * batch.num_samples)
    assert biggest < step_buffer_size(512, 16, 512, 16)


def test_worker_state_follows_the_policy_through_preemption_and_aborts():
    """A random workload on a small pool (preemptions, aborts, prefix hits): after every step the
    worker's tables hold each request's pages, and its counts each penalised row's history."""
    rng = random.Random(0)
    for _ in range(15):
        sched = policy(num_blocks=24, max_running=6)
        states = RequestStates(6, 120, VOCAB, torch.device("cpu"))
        pending = [
            Request(
                f"r{i}",
                [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 20))],
                PENALISED if rng.random() < 0.5 else SamplingParams(frequency_penalty=rng.choice([0.0, 0.5])),
                rng.randrange(1, 12),
            )
            for i in range(10)
        ]
        while pending or sched.has_work():
            if pending and rng.random() < 0.5:
                sched.add(pending.pop())
            if sched.running and rng.random() < 0.1:
                sched.finish(rng.choice(sched.running), "aborted")
            batch = sched.schedule()
            if batch is None:
                continue
            step = build_step(batch, 4)
            layout = step.layout()
            states.apply(step)
            states.start_histories(step, layout.num_histories)
            width = -(-max(layout.context_lens) // 4)
            tables = states.tables(step, width)
            assert tables.shape == (len(batch.requests), width)  # as wide as the longest context
            for b, req in enumerate(batch.requests):
                assert len(req.blocks) <= width and tables[b, : len(req.blocks)].tolist() == req.blocks
            rows = step.inputs.state_rows[step.sampling.rows]
            for row, (req, slot) in zip(rows.tolist(), _samplers(batch), strict=True):
                if req.params.penalised:
                    history = torch.tensor(req.token_ids[:slot])
                    assert torch.equal(states.counts[row], torch.bincount(history, minlength=VOCAB).float())
            sampled = torch.tensor(
                [rng.randrange(1, VOCAB) for _ in range(batch.num_samples)], dtype=torch.int64
            )
            if layout.penalised:
                states.count_sampled(step, sampled)
            sched.update(batch, sampled.tolist(), [0.0] * batch.num_samples)
        assert sched.block_manager.num_free == 24 and sorted(sched.free_rows) == list(range(6))


def _samplers(batch):
    return [(r, s) for r, s in zip(batch.requests, batch.sample_slots, strict=True) if s >= 0]


def test_grammar_rows_resume_on_the_worker_with_real_tokens_through_overlap_and_preemption():
    """With the overlap schedule (two steps in flight) on a small pool, with aborts and replays: a
    grammar request's first sample in a row brings its grammar with real tokens only, and the
    worker's matcher for the row, fed only with those and the tokens the worker sampled, is at the
    request's real output whenever the request samples (where a recompute or a replay resumes)."""
    rng = random.Random(1)
    resumes = preemptions = 0
    for _ in range(15):
        sched = policy(num_blocks=20, max_running=6)
        worker: dict[int, list[int]] = {}  # state row -> the tokens its matcher took
        inflight: list[tuple] = []
        pending = [_maybe_grammar_request(f"r{i}", rng) for i in range(10)]
        starts, checked = [], 0
        while pending or sched.has_work() or inflight:
            if pending and rng.random() < 0.5:
                sched.add(pending.pop())
            for req in sched.take_grammars():  # the worker compiles them at once
                sched.grammar_compiled(req)
            if sched.running and rng.random() < 0.05:
                sched.finish(rng.choice(sched.running), "aborted")
            batch = sched.schedule() if len(inflight) < 2 else None
            if batch is not None:
                step = build_step(batch, 4)
                starts += step.grammars
                inflight.append((batch, *_run_grammars(batch, step, worker, rng)))
            if inflight and (len(inflight) == 2 or batch is None):
                batch, sampled, seen = inflight.pop(0)
                sched.update(batch, sampled, [0.0] * len(sampled))
                for req, slot, epoch, tokens in seen:
                    if req.epoch == epoch and len(req.token_ids) > slot and req.token_ids[slot] >= 0:
                        assert tokens == req.token_ids[req.prompt_len : slot]
                        checked += 1
        resumes += sum(bool(start.output_ids) for start in starts)
        preemptions += sched.num_preemptions
        assert starts and checked and sched.block_manager.num_free == 20
    assert resumes and preemptions  # some rows started past tokens: a recompute's or a replay's


def _maybe_grammar_request(rid: str, rng: random.Random) -> Request:
    prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 20))]
    replayed = [rng.randrange(1, VOCAB) for _ in range(rng.choice([0, 0, 3]))]  # a replay's streamed tokens
    params = SamplingParams(grammar=Grammar("regex", "[a-z]+") if rng.random() < 0.6 else None)
    max_new = len(replayed) + rng.randrange(1, 12)
    return Request(rid, prompt + replayed, params, max_new, prompt_len=len(prompt), resumed=len(replayed))


def _run_grammars(batch, step: Step, worker: dict[int, list[int]], rng: random.Random) -> tuple:
    """The worker's side of a step: start the rows it brings, sample, feed the grammar rows' matchers.
    Returns the sampled tokens and, per grammar row, what its matcher had taken before sampling."""
    for start in step.grammars:
        assert min(start.output_ids, default=0) >= 0  # a placeholder: the worker could not resolve it
        worker[start.row] = list(start.output_ids)
    layout = step.layout()
    sampled = [rng.randrange(1, VOCAB) for _ in layout.sample_rows]
    seen = []
    for row, state_row in layout.grammar_rows:
        req, slot = _samplers(batch)[row]
        seen.append((req, slot, req.epoch, list(worker[state_row])))
        worker[state_row].append(sampled[row])
    return sampled, seen
