"""The per-step log lines and scripts/timeline read one format: what the engine and the worker log,
the timeline parses back."""

from __future__ import annotations

from tests import helpers
from tgi_zmq.steplog import SCHEDULER_STEP, WORKER_STEP


def test_the_timeline_parses_what_the_processes_log():
    sched = SCHEDULER_STEP.format(
        step=7, requests=16, tokens=16, build_ms=0.41, ahead=1, wait_ms=30.0, forward_ms=29.5, apply_ms=0.2
    )
    worker = WORKER_STEP.format(step=7, idle_ms=0.3, worker_forward_ms=29.5, comm_ms=0.0)
    other = WORKER_STEP.format(step=7, idle_ms=9.9, worker_forward_ms=9.9, comm_ms=9.9)
    lines = [
        f"2026-12-01 10:00:00,000 DEBUG scheduler {sched}",
        f"2026-12-01 10:00:00,001 DEBUG worker-0 {worker}",
        f"2026-12-01 10:00:00,001 DEBUG worker-1 {other}",  # rank 0's figures only
    ]
    steps = helpers.load_script("timeline").parse(lines)
    assert steps == {
        7: dict(
            requests=16.0,
            tokens=16.0,
            build_ms=0.41,
            ahead=1.0,
            wait_ms=30.0,
            forward_ms=29.5,
            apply_ms=0.2,
            idle_ms=0.3,
            worker_forward_ms=29.5,
            comm_ms=0.0,
        )
    }


REQUEST_LOG = """\
2026-12-01 10:00:00,100 INFO frontend rid=abc received route=/generate prompt_chars=24
2026-12-01 10:00:00,090 INFO frontend rid=abcd received route=/generate prompt_chars=3
2026-12-01 10:00:00,103 INFO tokenizer rid=abc tokenized in 1.20 ms: 6 input tokens, max_new_tokens 20
2026-12-01 10:00:00,104 DEBUG scheduler rid=abc queued: 6 prompt tokens
2026-12-01 10:00:00,105 DEBUG scheduler step 3: 2 requests, 7 tokens; built in 0.10 ms
2026-12-01 10:00:00,104 DEBUG scheduler rid=abc scheduled: 6 tokens in its first step, 0 cached
2026-12-01 10:00:00,160 INFO scheduler rid=abc first token after 0.060s
2026-12-01 10:00:00,161 DEBUG detokenizer rid=abc detokenizing: first token
2026-12-01 10:00:00,300 WARNING frontend tokenizer restarted: replaying 1 in-flight requests
2026-12-01 10:00:00,301 INFO frontend rid=abc replayed as abc~1 after 3 tokens
2026-12-01 10:00:00,420 INFO scheduler rid=abc~1 finished: length, 20 tokens
2026-12-01 10:00:00,421 INFO frontend rid=abcd~1 replayed as abcd~2 after 0 tokens
2026-12-01 10:00:00,422 INFO frontend rid=abc finished finish_reason=length generated_tokens=20
garbage line with rid=abc but no timestamp
"""


def test_the_timeline_follows_one_request_through_every_process(capsys):
    timeline = helpers.load_script("timeline")
    events = timeline.request_events(REQUEST_LOG.splitlines(keepends=True), "abc")
    processes = [process for _, process, _ in events]
    assert processes == [
        "frontend",
        "tokenizer",
        "scheduler",
        "scheduler",  # same millisecond: the log's order
        "scheduler",
        "detokenizer",
        "frontend",  # replayed as abc~1
        "scheduler",  # abc~1
        "frontend",
    ]
    assert events[3][2].startswith("rid=abc scheduled")
    assert not any("abcd" in line for _, _, line in events)
    timeline.print_request(events, "abc")
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "request abc: 9 lines over 322 ms"
    assert rows[2].split()[:3] == ["0", "0", "frontend"]
    assert rows[3].split()[:3] == ["3", "3", "tokenizer"]  # since the first, gap to the one before
    assert rows[-1].split()[:3] == ["322", "2", "frontend"]
