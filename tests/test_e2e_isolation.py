"""End to end, the error policy: a request whose handler raises in the tokenizer or in the scheduler, every
time it is sent, gets its own 500 in TGI's shape while 16 streams in flight get exactly the greedy tokens
each prompt gets alone (the service's steps are batch-invariant), and no process restarts (same pids, no
restart counted, no replay).

The poisoned requests are chosen by their sampling seed through the test hook ``TGI_ZMQ_TEST_FAULTS``
(``tgi_zmq.runtime``), set only for the fault tests' service (``faulty``, tests/conftest.py).
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import pids
from tests.test_e2e_faults import wait_until
from tgi_zmq.frontend.pipeline import MAX_REPLAYS

pytestmark = pytest.mark.e2e

MAX_NEW_TOKENS = 32
PROMPTS = [  # greedy, each goes on for MAX_NEW_TOKENS (no early end of sequence)
    "Here is a list of the planets of the solar system, from the closest to the sun to the farthest:",
    "Once upon a time, in a small village at the foot of a mountain covered in snow, there lived a",
    "def merge_sort(values):\n    # Sort a list of integers with merge sort and return a new list\n",
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz",
]
POISON = {"tokenizer": ("GenerateRequest", 4242), "scheduler": ("ScheduleRequest", 4343)}
PROCESSES = ("frontend", "tokenizer", "scheduler", "detokenizer", "worker")


@pytest.fixture(scope="module")
def reference(faulty) -> dict[str, list[int]]:
    """Each prompt's greedy tokens, sent alone."""
    expected = {}
    for prompt in PROMPTS:
        stream = GreedyStream(faulty, prompt)
        stream.join(timeout=180)
        assert stream.error is None and len(stream.tokens) == MAX_NEW_TOKENS, stream.error
        expected[prompt] = stream.tokens
    return expected


class GreedyStream(threading.Thread):
    """One greedy streaming request in a thread: its token ids, or the error that ended it."""

    def __init__(self, service, prompt: str):
        super().__init__(daemon=True)
        self.url, self.prompt = service.url + "/generate_stream", prompt
        self.tokens: list[int] = []
        self.error: str | None = None
        self.start()

    def run(self) -> None:
        body = {"inputs": self.prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS}}
        try:
            with requests.post(self.url, json=body, stream=True, timeout=180) as response:
                if response.status_code != 200:
                    self.error = f"{response.status_code} {response.text}"
                    return
                for line in response.iter_lines():
                    if line.startswith(b"data:"):
                        event = json.loads(line[5:])
                        if "error" in event:
                            self.error = str(event)
                            return
                        self.tokens.append(event["token"]["id"])
        except requests.RequestException as exc:
            self.error = repr(exc)


def poisoned_request(service, seed: int) -> requests.Response:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": seed}}
    return requests.post(service.url + "/generate", json=body, timeout=60)


def restarts(service) -> list[str]:
    metrics = requests.get(service.url + "/metrics", timeout=10).text
    counters = r"^tgi_process_restarts_total\{.*$|^tgi_request_replays_total .*$"
    return sorted(re.findall(counters, metrics, re.MULTILINE))


def test_a_poisoned_request_fails_alone_and_takes_no_process_and_no_stream_down(faulty, reference):
    before = {name: pids(faulty, name) for name in PROCESSES}
    counted = restarts(faulty)
    streams = [GreedyStream(faulty, prompt) for prompt in PROMPTS * 4]
    wait_until(lambda: all(len(s.tokens) >= 2 or s.error for s in streams), 120, "streams started")
    assert all(len(s.tokens) < MAX_NEW_TOKENS for s in streams), "the poison came after the load"

    sends = [(process, seed) for process, (_, seed) in POISON.items() for _ in range(MAX_REPLAYS + 1)]
    with ThreadPoolExecutor(len(sends)) as pool:
        answers = list(pool.map(lambda send: poisoned_request(faulty, send[1]), sends))
    for (process, _), answer in zip(sends, answers, strict=True):
        assert answer.status_code == 500, answer.text
        error = f"Internal error in the {process} (RuntimeError)"
        assert answer.json() == {"error": error, "error_type": "internal"}

    for stream in streams:
        stream.join(timeout=180)
    assert not [s.error for s in streams if s.error]
    for stream in streams:
        assert stream.tokens == reference[stream.prompt], stream.prompt
    assert {name: pids(faulty, name) for name in PROCESSES} == before
    assert restarts(faulty) == counted
    log = faulty.log()
    for process in POISON:
        failures = re.findall(rf" {process} rid=\S+ failed \(alone\): RuntimeError: fault injected", log)
        assert len(failures) == MAX_REPLAYS + 1
