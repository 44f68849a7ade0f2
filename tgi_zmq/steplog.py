"""The per-step DEBUG log lines and their parser, one format for both (``scripts/timeline`` reads them).

A line is a message template logged by ``process`` (the log format puts the process name before the
message, ``tgi_zmq.runtime.setup_logging``). Its ``{name}`` fields are integers (``{name:d}``) or
milliseconds (``{name:ms}``, two decimals); ``StepLine.parse`` reads back what the template wrote.
"""

from __future__ import annotations

import re


class StepLine:
    def __init__(self, process: str, template: str):
        self.template = template
        self.fields = re.findall(r"\{(\w+):(d|ms)\}", template)
        pattern = re.escape(f"{process} {template}")
        for name, kind in self.fields:
            number = r"\d+" if kind == "d" else r"[\d.]+"
            pattern = pattern.replace(re.escape(f"{{{name}:{kind}}}"), f"(?P<{name}>{number})")
        self.pattern = re.compile(pattern)

    def format(self, **values: float) -> str:
        text = self.template
        for name, kind in self.fields:
            value = values[name]
            text = text.replace(f"{{{name}:{kind}}}", f"{value:d}" if kind == "d" else f"{value:.2f}")
        return text

    def parse(self, line: str) -> dict[str, float] | None:
        match = self.pattern.search(line)
        return None if match is None else {k: float(v) for k, v in match.groupdict().items()}


SCHEDULER_STEP = StepLine(
    "scheduler",
    "step {step:d}: {requests:d} requests, {tokens:d} tokens; "
    "built in {build_ms:ms} ms with {ahead:d} step(s) in flight; "
    "waited {wait_ms:ms} ms for the result (forward {forward_ms:ms} ms); applied in {apply_ms:ms} ms",
)
WORKER_STEP = StepLine(  # rank 0's lines
    "worker-0",
    "step {step:d}: idle {idle_ms:ms} ms before it, forward {worker_forward_ms:ms} ms, "
    "all-reduce {comm_ms:ms} ms",
)
