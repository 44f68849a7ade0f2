"""Launcher configuration: limits derived from the model and the memory, clear start-up errors."""

import json
import math
import subprocess
import sys

import pytest

from tgi_zmq import cli
from tgi_zmq.convert import default_model_dir
from tgi_zmq.memory import kv_bytes_per_token, weights_bytes


def smol_config() -> dict:
    return json.loads((default_model_dir() / "config.json").read_text())


def test_kv_bytes_per_token_of_smollm2():
    # 30 layers x (K and V) x 3 KV heads x 64 dims x 2 bytes
    assert kv_bytes_per_token(smol_config(), "bfloat16") == 30 * 2 * 3 * 64 * 2


def test_weights_bytes_reads_the_safetensors_headers():
    from safetensors import safe_open

    with safe_open(default_model_dir() / "model.safetensors", "pt") as f:
        numel = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118 (not a dict)
    assert weights_bytes(default_model_dir(), "bfloat16") == 2 * numel


def resolve(*flags: str):
    args = cli.build_parser().parse_args(["launch", *flags])
    return cli.resolve_config(args, "/tmp/unused")


def test_defaults_follow_the_memory_budget_and_context():
    config = resolve("--dtype", "bfloat16")
    assert config.max_batch_total_tokens > 8192
    assert config.max_total_tokens == 8192  # SmolLM2's context
    assert config.max_input_tokens == 8191
    small = resolve("--dtype", "bfloat16", "--max-batch-total-tokens", "1000")
    assert small.max_total_tokens == 1000 and small.max_input_tokens == 999


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-batch-total-tokens", "1000", "--max-total-tokens", "2000"], "lower --max-total-tokens"),
        (["--max-total-tokens", "100", "--max-input-tokens", "100"], "must be < --max-total-tokens"),
        (["--dtype", "float16"], "no fast path"),
    ],
)
def test_impossible_limits_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        resolve(*flags)


def test_launch_exits_with_a_clear_message():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tgi_zmq.cli",
            "launch",
            "--max-batch-total-tokens",
            "64",
            "--max-total-tokens",
            "128",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "does not fit in a KV cache of 64 tokens" in out.stderr + out.stdout
