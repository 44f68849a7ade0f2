"""scripts/quality: its pure parts (windows, perplexity, agreement, prompts) and one short run of one
mode against the real service."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import helpers
from tgi_zmq.convert import default_model_dir
from tgi_zmq.memory import weights_bytes

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "quality"


quality = helpers.load_script("quality")


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def unchars(ids) -> str:
    return "".join(map(chr, ids))


def test_parse_mode_splits_label_and_flags():
    assert quality.parse_mode("int8=--dtype float32 --quantize bitsandbytes") == (
        "int8",
        ["--dtype", "float32", "--quantize", "bitsandbytes"],
    )
    assert quality.parse_mode("q4='--model-id' '/a b/m.gguf'") == ("q4", ["--model-id", "/a b/m.gguf"])
    with pytest.raises(ValueError):
        quality.parse_mode("--dtype float32")


def test_windows_cover_the_ids_without_overlap():
    ids = chars("abcdefghij")
    windows = quality.cut_windows(ids, 4, chars, unchars)
    assert windows == [chars("abcd"), chars("efgh"), chars("ij")]
    assert quality.cut_windows(chars("abcde"), 4, chars, unchars) == [chars("abcd")]  # a lone last id


def test_windows_end_only_where_their_text_encodes_back():
    def encode(text: str) -> list[int]:  # a text that ends in "q" tokenizes otherwise than inside "qu"
        return chars(text) + ([0] if text.endswith("q") else [])

    ids = encode("aaquaaquaa")
    windows = quality.cut_windows(ids, 3, encode, unchars)
    assert windows == [chars("aa"), chars("qua"), chars("aqu"), chars("aa")]


def test_windows_of_the_real_tokenizer_round_trip(tokenizer):
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(ids) -> str:
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    ids = encode(quality.DEFAULT_TEXT.read_text())
    assert 3000 <= len(ids) <= 6500
    windows = quality.cut_windows(ids, 64, encode, decode)
    assert sum(windows, []) == ids
    assert all(2 <= len(w) <= 64 and encode(decode(w)) == w for w in windows)


def test_perplexity_is_exp_of_the_mean_negative_logprob():
    assert quality.perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    assert quality.perplexity([math.log(0.5), math.log(0.125)]) == pytest.approx(4.0)


def test_agreement_counts_identical_outputs_and_common_prefixes():
    base = [[1, 2, 3], [1, 2, 3], [5], [7, 8]]
    other = [[1, 2, 3], [1, 9, 3], [5], [7, 8, 9, 10]]
    result = quality.agreement(base, other)
    assert result["exact"] == 2 and result["prompts"] == 4 and result["differing"] == [1, 3]
    assert result["mean_prefix"] == pytest.approx((1 + 1 / 3 + 1 + 2 / 4) / 4)
    assert quality.agreement(base, base)["mean_prefix"] == 1.0  # early stops that agree count fully


def test_prompts_are_sentence_heads_spread_over_the_text():
    text = "One two three four. Five six!\n\nSeven eight nine ten eleven? Twelve thirteen fourteen fifteen."
    assert quality.sentences(text) == [
        "One two three four.",
        "Five six!",
        "Seven eight nine ten eleven?",
        "Twelve thirteen fourteen fifteen.",
    ]

    def words(s: str) -> list[str]:
        return s.split()

    prompts = quality.make_prompts(text, 2, 3, words, " ".join)
    assert prompts == ["One two three", "Seven eight nine"]
    with pytest.raises(ValueError):
        quality.make_prompts(text, 4, 3, words, " ".join)


@pytest.mark.e2e
def test_one_mode_against_the_real_service_gives_its_figures(tmp_path):
    """One launch (each launch is ~12 s; the comparison of modes is the pure functions' above)."""
    out = tmp_path / "quality.json"
    cmd = [sys.executable, str(SCRIPT), "--mode", "a=--dtype float32"]
    cmd += ["--window", "32", "--max-windows", "2", "--prompts", "3", "--prompt-tokens", "8"]
    cmd += ["--max-new-tokens", "6", "--port", "8650", "--json", str(out)]
    started = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-4000:]
    record = json.loads(out.read_text())
    (a,) = record["modes"].values()
    assert list(record["modes"]) == ["a"]
    assert 1 < a["ppl"] < 10_000 and math.isfinite(a["ppl"])
    assert a["scored_tokens"] == record["text"]["windows"] * 31 == 62
    assert a["model_dtype"] == "float32" and a["workers"] == 1
    weights_mb = weights_bytes(default_model_dir(), "float32") / 1e6
    assert weights_mb < a["rss_mb"] <= a["peak_mb"], (weights_mb, a)  # the worker's, weights included
    timed = [a[phase] for phase in ("load_s", "measure_s")]  # seconds, in this run
    assert min(timed) > 0 and sum(timed) < elapsed, (timed, elapsed)
    assert record["machine"]["cpu_model"] is not None and record["command"].startswith("scripts/quality")
    assert "| a |" in run.stdout
