"""The engine over a model in this process, with no worker processes: the tests and offline use.

``LocalExecutor`` runs each step at once on a ``ModelRunner``; ``run_to_completion`` feeds requests
to an ``EngineCore`` and turns it until they are done. The service's executor is
``tgi_zmq.worker_group``; this module is the only one on the scheduler's side that loads a model.
"""

from __future__ import annotations

import time
from collections import deque

from tgi_zmq.engine import EngineCore, StepDone, StepFailure
from tgi_zmq.messages import Grammar
from tgi_zmq.model_runner import ModelRunner
from tgi_zmq.policy import Request
from tgi_zmq.step import Step


class LocalExecutor:
    """Runs each step at once on a model in this process (tests, offline use)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.results: dict[int, StepDone | StepFailure] = {}

    def submit(self, step_id: int, step: Step) -> None:
        started = time.perf_counter()
        output = self.runner.execute(step)
        self.results[step_id] = StepDone(output, time.perf_counter() - started, self.runner.sample_seconds)

    def result(self, step_id: int) -> StepDone | StepFailure | None:
        return self.results.pop(step_id, None)

    def restart(self, spare: int | None = None) -> None:
        self.results.clear()
        self.runner.cache = self.runner.model.new_cache(self.runner.num_blocks, self.runner.block_size)
        self.runner.forget_requests()

    def compile_grammar(self, rid: str, grammar: Grammar) -> None:
        self.runner.grammars.announce(rid, grammar)

    def compiled_grammars(self) -> list[tuple[str, str]]:
        return self.runner.grammars.compiled()

    def drop_grammars(self, rows: list[int], rids: list[str]) -> None:
        self.runner.grammars.drop(rows, rids)


def run_to_completion(engine: EngineCore, requests: list[Request], arrive_every: int = 0) -> None:
    """Feed ``requests`` to the engine (``arrive_every`` turns apart, 0: all at once) and turn it
    until every one has finished."""
    arrivals = deque(requests)
    turn = 0
    while arrivals or engine.has_work():
        while arrivals and turn >= arrive_every * (len(requests) - len(arrivals)):
            engine.policy.add(arrivals.popleft())
        turn += 1
        out = engine.step()
        if out.failed:
            raise RuntimeError(f"requests failed: {out.failed}")
