"""The engine core without ZeroMQ: overlap, worker losses, failed steps and the watchdog, driven by
in-process executors around a tiny model."""

from __future__ import annotations

import pytest

from tests.helpers import run_engine
from tgi_zmq import sampler
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.engine import (
    MAX_FAULTS,
    ROW_FAILED,
    WATCHDOG_SECONDS_PER_PAIR,
    EngineCore,
    StepFailure,
    WorkersLost,
    allowance,
)
from tgi_zmq.messages import Grammar, SamplingParams, TokenBias
from tgi_zmq.model_runner import ModelRunner
from tgi_zmq.offline import LocalExecutor, run_to_completion
from tgi_zmq.policy import Request, ScheduledBatch, SchedulePolicy
from tgi_zmq.worker_group import public_reason

PROMPTS = [[1, 5, 9, 13, 17, 21], [1, 7, 3], [1, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
PARAMS = [SamplingParams(), SamplingParams(do_sample=True, temperature=0.9, seed=5), SamplingParams()]
MAX_NEW = 8


@pytest.fixture(scope="module")
def folder(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="module")
def undisturbed(folder):
    return run_engine(folder, PROMPTS, PARAMS, MAX_NEW)[0]


class Recording(LocalExecutor):
    """Runs steps at once; records how many were in flight at each submit, and can misbehave."""

    def __init__(self, runner: ModelRunner, engine_ref: list):
        super().__init__(runner)
        self.engine_ref = engine_ref
        self.depths: list[int] = []  # steps in flight at each submit, the submitted one included
        self.submitted = 0
        self.lose_at: set[int] = set()  # submits (1-based) at which the workers are found gone
        self.fail_at: set[int] = set()  # submits whose step fails
        self.hang_at: set[int] = set()  # submits whose result never comes
        self.restarts: list[int | None] = []

    def submit(self, step_id, step):
        self.submitted += 1
        self.depths.append(len(self.engine_ref[0].inflight))
        if self.submitted in self.lose_at:
            raise WorkersLost("gone")
        if self.submitted in self.fail_at:
            self.results[step_id] = StepFailure("RuntimeError: boom")
            return
        if self.submitted in self.hang_at:
            return
        super().submit(step_id, step)

    def restart(self, spare=None):
        self.restarts.append(spare)
        super().restart(spare)


def engine_for(folder, overlap=True, watchdog_timeout=20.0) -> tuple[EngineCore, Recording]:
    runner = ModelRunner(str(folder), "float32", "cpu", 64, 4, max_rows=8, max_total_tokens=256)
    policy = SchedulePolicy(BlockManager(64, 4), 64, 8, (), 256)
    ref: list = []
    executor = Recording(runner, ref)
    engine = EngineCore(policy, executor, 4, overlap=overlap, watchdog_timeout=watchdog_timeout)
    ref.append(engine)
    return engine, executor


def requests() -> list[Request]:
    return [Request(f"r{i}", p, sp, MAX_NEW) for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS, strict=True))]


def test_overlap_keeps_two_steps_in_flight_and_the_same_tokens(folder, undisturbed):
    engine, executor = engine_for(folder, overlap=True)
    reqs = requests()
    run_to_completion(engine, reqs)
    assert [r.output_ids for r in reqs] == undisturbed
    assert max(executor.depths) == 2  # a step is submitted while the one before it is in flight
    assert engine.policy.block_manager.num_free == 64

    engine, executor = engine_for(folder, overlap=False)
    reqs = requests()
    run_to_completion(engine, reqs)
    assert [r.output_ids for r in reqs] == undisturbed and max(executor.depths) == 1


@pytest.mark.parametrize("lose_at", [1, 3, 6])
def test_lost_workers_restart_and_every_request_recomputes_to_the_same_tokens(folder, undisturbed, lose_at):
    engine, executor = engine_for(folder)
    executor.lose_at = {lose_at}
    reqs = requests()
    run_to_completion(engine, reqs)
    assert executor.restarts == [None]
    assert [r.output_ids for r in reqs] == undisturbed
    assert engine.policy.block_manager.num_free == 64


def test_a_request_fails_after_max_faults(folder):
    engine, executor = engine_for(folder)
    executor.lose_at = set(range(1, 100))  # the workers are lost at every step
    engine.policy.add(requests()[0])
    failed = []
    for _ in range(20):
        failed += engine.step().failed
        if not engine.has_work():
            break
    assert len(executor.restarts) == MAX_FAULTS
    assert [(req.rid, req.finish_reason) for req, _ in failed] == [("r0", "error")]
    assert f"failed {MAX_FAULTS} times" in failed[0][1]
    assert engine.policy.block_manager.num_free == 64


def test_a_failed_step_fails_its_requests_and_the_others_go_on(folder, undisturbed):
    engine, executor = engine_for(folder, overlap=False)
    reqs = requests()
    engine.policy.add(reqs[0])
    out = engine.step()  # r0's prefill
    assert out.produced and not out.failed
    executor.fail_at = {executor.submitted + 1}
    out = engine.step()  # r0's first decode fails
    assert [(req.rid, reason) for req, reason in out.failed] == [("r0", "RuntimeError: boom")]
    assert reqs[0].finish_reason == "error" and not executor.restarts
    run_to_completion(engine, reqs[1:])
    assert [r.output_ids for r in reqs[1:]] == undisturbed[1:]
    assert engine.policy.block_manager.num_free == 64


def run_with_failures(engine: EngineCore, reqs: list[Request]) -> list[tuple[str, str]]:
    """Turn the engine until every request ended; returns the failed ones' (rid, reason)."""
    for req in reqs:
        engine.policy.add(req)
    failed = []
    while engine.has_work():
        failed += [(req.rid, reason) for req, reason in engine.step().failed]
    return failed


def test_a_turn_that_fills_the_last_place_in_flight_waits_for_input(folder):
    """The scheduler's loop turns again at once only after a turn that may be followed by more."""
    engine, executor = engine_for(folder)
    executor.hang_at = set(range(1, 100))  # no result comes
    engine.policy.add(Request("a", PROMPTS[0], PARAMS[0], MAX_NEW))
    first, second = engine.step(), engine.step()
    assert first.launched and first.progressed  # room for a second step: the loop turns again
    assert second.launched and not second.progressed  # two in flight, none answered: it waits


@pytest.mark.parametrize("overlap", [False, True])
def test_a_row_biasing_a_token_the_model_lacks_fails_alone(folder, undisturbed, overlap):
    """The tokenizer refuses such a request (a 422); past it, the worker must still not index past the
    logits: that row fails, the others of its steps get their tokens."""
    engine, executor = engine_for(folder, overlap=overlap)
    bad = Request("bad", [1, 5, 9], SamplingParams(logit_bias=[TokenBias(512, 5.0)]), MAX_NEW)  # vocab 512
    reqs = requests()
    assert run_with_failures(engine, [reqs[0], bad, *reqs[1:]]) == [("bad", ROW_FAILED)]
    assert [r.output_ids for r in reqs] == undisturbed and bad.finish_reason == "error"
    assert not executor.restarts and engine.policy.block_manager.num_free == 64


def test_a_row_whose_sampling_raises_fails_alone(folder, undisturbed, monkeypatch):
    """Sampling the batch raises: each row is sampled alone, the one that raises again fails alone."""
    draw = sampler._sample_row

    def poisoned(row_logits, d):
        if d.seed == 666:
            raise RuntimeError("a row that cannot sample")
        return draw(row_logits, d)

    monkeypatch.setattr(sampler, "_sample_row", poisoned)
    engine, executor = engine_for(folder)
    bad = Request("bad", [1, 5, 9], SamplingParams(do_sample=True, seed=666), MAX_NEW)
    reqs = requests()
    assert run_with_failures(engine, [*reqs[:2], bad, reqs[2]]) == [("bad", ROW_FAILED)]
    assert [r.output_ids for r in reqs] == undisturbed
    assert not executor.restarts and engine.policy.block_manager.num_free == 64


def test_the_watchdog_restarts_hung_workers_with_a_growing_bound(folder, undisturbed):
    engine, executor = engine_for(folder, watchdog_timeout=0.05)
    executor.hang_at = {2}
    reqs = requests()
    run_to_completion(engine, reqs)
    assert executor.restarts == [None]
    assert [r.output_ids for r in reqs] == undisturbed
    assert engine.watchdog_strikes == 0  # reset once a step completed

    engine, executor = engine_for(folder, watchdog_timeout=0.05)
    executor.hang_at = set(range(1, 100))
    engine.policy.add(requests()[0])
    step = None
    while not executor.restarts:
        engine.step()
        step = engine.inflight[0] if engine.inflight else step
    first_bound = engine.deadline(step) - max(step.sent, engine.last_done)
    assert engine.watchdog_strikes == 1 and first_bound == pytest.approx(2 * (0.05 + allowance(step.batch)))


def test_the_watchdog_allows_a_long_prompts_chunks_their_attention():
    """A step's bound grows with its tokens and with the query-key pairs it attends: the second 3,904
    tokens of an 8,000-token prompt attend to ~6,000 keys each (a watchdog of 20 s + 5 ms a token killed
    their worker, again and again, until the request failed)."""
    first, second, decode = ScheduledBatch(), ScheduledBatch(), ScheduledBatch()
    first.starts, first.num_new = [0], [4096]
    second.starts, second.num_new = [4096], [3904]
    decode.starts, decode.num_new = [8000] * 4, [1] * 4
    assert allowance(decode) == pytest.approx(4 * (0.005 + 8001 * WATCHDOG_SECONDS_PER_PAIR))
    pairs = 3904 * 4096 + 3904 * 3905 // 2
    assert allowance(second) == pytest.approx(3904 * 0.005 + pairs * WATCHDOG_SECONDS_PER_PAIR)
    assert allowance(second) > 2 * allowance(first) > 60


def test_making_progress_follows_the_oldest_step(folder):
    engine, executor = engine_for(folder, watchdog_timeout=0.05)
    executor.hang_at = {1}
    engine.policy.add(requests()[0])
    assert engine.making_progress()
    engine.step()
    assert engine.inflight and engine.making_progress()
    engine.inflight[0].sent -= 1.0
    engine.last_done -= 1.0
    assert not engine.making_progress()


def test_clients_never_see_source_paths_of_a_worker_error():
    gloo = (
        "RuntimeError: [/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
        "[127.0.0.1]:41234\nException raised from recvFromPeer at /pytorch/torch/csrc/c10d/x.cpp:99"
    )
    reason = public_reason(gloo)
    assert "/" not in reason and ".cc" not in reason and "\n" not in reason
    assert reason.startswith("RuntimeError:") and "Connection closed by peer" in reason
    assert public_reason("") == "unknown error"


def test_workers_lost_while_announcing_a_grammar_launch_nothing_in_that_turn(folder):
    """The loss restarts the workers and requeues every request: the same turn must not build a step
    for workers that are gone (it would count the loss twice, or reach a dead worker)."""

    class LostOnAnnounce(LocalExecutor):
        submitted = 0

        def compile_grammar(self, rid: str, grammar: Grammar) -> None:
            raise WorkersLost("worker-0 is gone")

        def submit(self, step_id: int, step) -> None:
            self.submitted += 1
            super().submit(step_id, step)

    runner = ModelRunner(str(folder), "float32", "cpu", 64, 4, max_rows=8, max_total_tokens=256)
    executor = LostOnAnnounce(runner)
    engine = EngineCore(SchedulePolicy(BlockManager(64, 4), 64, 8, (), 256), executor, 4)
    plain = Request("p", PROMPTS[0], SamplingParams(), MAX_NEW)
    constrained = Request("g", PROMPTS[1], SamplingParams(grammar=Grammar("regex", "[0-9]+")), MAX_NEW)
    engine.policy.add(plain)
    engine.policy.add(constrained)
    out = engine.step()
    assert not out.launched and executor.submitted == 0 and not out.failed
    assert plain.faults == 0 and list(engine.policy.waiting) == [plain, constrained]


def test_a_windowed_model_recomputes_after_lost_workers_to_the_same_tokens(tiny_models):
    """Mistral (a window of 8): the requests lose the pages freed behind their window with the rest of the
    cache, recompute on fresh workers and give the tokens of an undisturbed run."""
    folder = tiny_models("mistral")
    prompts = [list(range(3, 43)), list(range(50, 80))]
    reqs_params = [SamplingParams(), SamplingParams(do_sample=True, seed=3)]

    def run(lose_at: set[int]) -> tuple[list[list[int]], Recording, EngineCore]:
        runner = ModelRunner(str(folder), "float32", "cpu", 64, 4, max_rows=8, max_total_tokens=256)
        policy = SchedulePolicy(BlockManager(64, 4, window=8), 16, 8, (), 256)
        ref: list = []
        executor = Recording(runner, ref)
        engine = EngineCore(policy, executor, 4)
        ref.append(engine)
        executor.lose_at = lose_at
        reqs = [
            Request(f"w{i}", p, sp, 20) for i, (p, sp) in enumerate(zip(prompts, reqs_params, strict=True))
        ]
        run_to_completion(engine, reqs)
        return [r.output_ids for r in reqs], executor, engine

    undisturbed, _, _ = run(set())
    lost, executor, engine = run({9})  # both decoding, past the window: pages freed
    assert executor.restarts == [None] and lost == undisturbed
    assert engine.policy.block_manager.num_free == engine.policy.block_manager.capacity
