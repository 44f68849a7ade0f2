"""Launcher configuration: limits derived from the model and the memory, clear start-up errors."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import built_extension
from tgi_zmq import cli, models, native
from tgi_zmq.config import DEFAULT_PREFILL_TOKENS, ServerConfig
from tgi_zmq.convert import DEFAULT_MODEL_NAME, default_model_dir
from tgi_zmq.cpus import placement, service_cores
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
    assert config.vocab_size == smol_config()["vocab_size"]  # the bound of the token ids a client names
    small = resolve("--dtype", "bfloat16", "--max-batch-total-tokens", "1000")
    assert small.max_total_tokens == 1000 and small.max_input_tokens == 999


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-batch-total-tokens", "1000", "--max-total-tokens", "2000"], "lower --max-total-tokens"),
        (["--max-total-tokens", "100", "--max-input-tokens", "100"], "must be < --max-total-tokens"),
        (["--dtype", "float16"], "no fast path"),
        (["--replicas", "0"], "--replicas 0: at least 1"),
        (["--replicas", "999"], "999 replicas on .* cores: at most one replica a core"),
        (["--replicas", "2", "--router-policy", "nearest"], "--router-policy nearest: choose cache_aware"),
        (["--kv-events-endpoint", "localhost:5557"], "a ZeroMQ address"),
        (
            ["--nnodes", "2", "--node-rank", "2", "--num-shard", "2"],
            "--node-rank 2 is out of range for --nnodes 2",
        ),
        (["--nnodes", "2", "--num-shard", "3"], "--num-shard 3 does not split evenly over --nnodes 2"),
        (["--nnodes", "2", "--num-shard", "2", "--replicas", "2"], "--replicas and --nnodes do not combine"),
        (["--kv-events-replay-endpoint", "tcp://*:5558"], "give both"),
        (["--kv-events-endpoint", "tcp://*:5557", "--disable-prefix-caching"], "describe the prefix cache"),
    ],
)
def test_impossible_limits_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        resolve(*flags)


def test_replicas_split_the_cores_ports_and_kv_budget(monkeypatch):
    from tgi_zmq import cpus, replicas

    monkeypatch.setattr(cpus, "service_cores", lambda: [0, 1, 2])
    monkeypatch.setattr(cli, "kv_budget", lambda *_: 20_000)  # what the free memory holds
    config = resolve(
        *("--dtype", "bfloat16", "--replicas", "2", "--port", "9000", "--served-model-name", "tgi", "smol"),
        *("--kv-events-endpoint", "tcp://*:5557", "--kv-events-replay-endpoint", "ipc:///tmp/replay"),
    )
    assert config.max_batch_total_tokens == 10_000  # the memory is shared
    first, second = replicas.replica_configs(config)
    assert (first.cpus, second.cpus) == ((0, 1), (2,))
    assert (first.port, second.port, first.hostname) == (9001, 9002, "127.0.0.1")
    assert (first.shm_prefix, second.shm_prefix) == ("tgi-zmq-unused-0", "tgi-zmq-unused-1")  # the set's name
    assert (first.replicas, first.master_port, second.master_port) == (1, 29500, 29501)
    assert (first.kv_events_endpoint, second.kv_events_endpoint) == ("tcp://*:5557", "tcp://*:5558")
    assert second.kv_events_replay_endpoint == "ipc:///tmp/replay-1"
    command = replicas.router_command(config)
    assert command[1:3] == ["launch", "--host"] and "--model-alias" in command
    assert command[command.index("--worker-urls") + 1 : command.index("--policy")] == [
        "http://127.0.0.1:9001",
        "http://127.0.0.1:9002",
    ]
    assert command[command.index("--model-alias") + 1] == "smol=tgi"  # SMG registers the first name


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


def write_config(folder, **config) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_an_unsupported_architecture_is_refused_with_the_supported_list(tmp_path):
    folder = write_config(tmp_path / "gpt2", model_type="gpt2", n_layer=2, n_head=2, n_embd=8)
    supported = ", ".join(sorted(models.ARCHITECTURES))  # "bloom, llama, mistral, ..."
    with pytest.raises(ValueError, match=rf"'gpt2'.*not supported; supported: {supported}$"):
        resolve("--model-id", folder, "--max-batch-total-tokens", "4096")


def test_a_sliding_window_no_longer_caps_the_context(tmp_path):
    """The attention reads each layer's window (tgi_zmq.attention): the context is the model's, all but
    the page a windowed pool keeps as its null page (tgi_zmq.block_manager); the scheduler is told the
    window when every layer has one."""
    mistral = dict(
        model_type="mistral",
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=64,
        max_position_embeddings=32768,
        sliding_window=1024,
    )
    folder = write_config(tmp_path / "mistral", **mistral)
    config = resolve("--model-id", folder, "--max-batch-total-tokens", "8192")
    assert config.kv_window == 1024 and config.max_total_tokens == 8192 - config.block_size
    config = resolve("--model-id", folder, "--max-batch-total-tokens", "8192", "--max-total-tokens", "2048")
    assert config.max_total_tokens == 2048


@pytest.mark.parametrize(
    ("config", "kv_window"),
    [
        (dict(model_type="mistral", sliding_window=None), None),
        (dict(model_type="starcoder2", sliding_window=4096), 4096),
        (dict(model_type="qwen2", sliding_window=4096), None),  # use_sliding_window is off
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4096, max_window_layers=0), 4096),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4096, max_window_layers=1), None),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4096), None),  # 28 full layers
        (dict(model_type="gemma2", sliding_window=4096), None),  # its global layers see everything
        (dict(model_type="gemma3_text", sliding_window=512, layer_types=["sliding_attention"] * 2), 512),
        (dict(model_type="llama"), None),
        (dict(model_type="bloom"), None),
    ],
)
def test_the_scheduler_frees_pages_behind_a_window_only_when_every_layer_has_it(config, kv_window):
    hf = dict(num_hidden_layers=2, **config)
    assert models.architecture(hf)[0].kv_window(hf) == kv_window


def test_cache_geometry_of_bloom_and_t5_configs():
    bloom = dict(model_type="bloom", n_layer=3, n_head=4, hidden_size=64, vocab_size=256)
    assert kv_bytes_per_token(bloom, "float32") == 3 * 2 * 4 * 16 * 4
    t5 = dict(model_type="t5", num_layers=6, num_decoder_layers=2, num_heads=4, d_kv=8, d_model=32, d_ff=64)
    t5["vocab_size"] = 256
    assert kv_bytes_per_token(t5, "float32") == 2 * 2 * 4 * 8 * 4  # decoder layers only


def test_t5_gets_its_decoder_start_token(tmp_path):
    t5 = dict(model_type="t5", is_encoder_decoder=True, num_layers=2, num_heads=4, d_kv=8, d_model=32)
    folder = write_config(tmp_path / "t5", decoder_start_token_id=0, **t5)
    assert resolve("--model-id", folder, "--max-batch-total-tokens", "4096").decoder_start_token_id == 0
    llama = resolve("--max-batch-total-tokens", "9000")
    assert llama.decoder_start_token_id is None


def test_eos_ids_come_from_config_and_generation_config(tmp_path):
    folder = tmp_path / "m"
    write_config(folder, model_type="llama", eos_token_id=2)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9], "bos_token_id": 1}))
    assert models.eos_token_ids(folder, json.loads((folder / "config.json").read_text())) == (2, 7, 9)


def test_a_shard_count_that_cannot_split_the_heads_is_refused_at_start():
    # SmolLM2: 9 query heads over 3 KV heads. 2 or 3 shards split them; 4 cannot.
    assert resolve("--num-shard", "2", "--max-batch-total-tokens", "9000").num_shard == 2
    with pytest.raises(ValueError, match="--num-shard 4 cannot split 9 heads over 3 KV heads"):
        resolve("--num-shard", "4", "--max-batch-total-tokens", "9000")


def test_guard_flags_come_from_the_command_line_or_their_env_vars(monkeypatch):
    plain = resolve("--max-batch-total-tokens", "9000")
    assert (plain.api_key, plain.body_timeout, plain.shutdown_timeout) == (None, 10.0, 20.0)
    monkeypatch.setenv("API_KEY", "k1")
    monkeypatch.setenv("BODY_TIMEOUT", "2.5")
    monkeypatch.setenv("SHUTDOWN_TIMEOUT", "7")
    from_env = resolve("--max-batch-total-tokens", "9000")
    assert (from_env.api_key, from_env.body_timeout, from_env.shutdown_timeout) == ("k1", 2.5, 7.0)
    assert resolve("--max-batch-total-tokens", "9000", "--api-key", "k2").api_key == "k2"
    with pytest.raises(ValueError, match="--body-timeout must be > 0"):
        resolve("--max-batch-total-tokens", "9000", "--body-timeout", "0")
    with pytest.raises(ValueError, match="--sse-keep-alive must be >= 0"):
        resolve("--max-batch-total-tokens", "9000", "--sse-keep-alive", "-1")
    assert resolve("--max-batch-total-tokens", "9000", "--sse-keep-alive", "0").sse_keep_alive == 0


def test_served_model_names_are_the_models_and_tgi_unless_given(monkeypatch):
    """vLLM's --served-model-name; by default the model's name and TGI's "tgi" (its examples' model)."""
    flags = ("--max-batch-total-tokens", "9000")
    assert resolve(*flags).served_model_names == (DEFAULT_MODEL_NAME, "tgi")
    given = resolve(*flags, "--served-model-name", "smol", "chat", "smol")
    assert given.served_model_names == ("smol", "chat") and given.served_model_name == "smol"
    monkeypatch.setenv("SERVED_MODEL_NAME", "a b")
    assert resolve(*flags).served_model_names == ("a", "b")
    with pytest.raises(ValueError, match="a name cannot be empty"):
        resolve(*flags, "--served-model-name", " ")


def test_flag_defaults_are_the_config_defaults():
    config = resolve("--max-batch-total-tokens", "9000")
    defaults = ServerConfig(model_id="m", served_model_names=("m",), runtime_dir="/tmp/unused")
    fields = "port hostname max_concurrent_requests payload_limit master_port torch_threads api_key"
    for field in fields.split():
        assert getattr(config, field) == getattr(defaults, field), field
    assert config.enable_prefix_caching and config.overlap_schedule
    assert config.max_batch_prefill_tokens == DEFAULT_PREFILL_TOKENS


@pytest.mark.parametrize("value", ["1", "true", "TRUE"])
def test_switches_come_from_the_command_line_or_their_env_vars(monkeypatch, value):
    flags = ("--max-batch-total-tokens", "9000")
    assert not resolve(*flags, "--disable-prefix-caching").enable_prefix_caching
    assert not resolve(*flags, "--disable-overlap-schedule").overlap_schedule
    assert resolve(*flags, "--disable-grammar-support").disable_grammar_support
    assert not resolve(*flags).disable_grammar_support
    monkeypatch.setenv("DISABLE_PREFIX_CACHING", value)
    monkeypatch.setenv("DISABLE_OVERLAP_SCHEDULE", value)
    monkeypatch.setenv("DISABLE_GRAMMAR_SUPPORT", value)
    from_env = resolve(*flags)
    assert not from_env.enable_prefix_caching and not from_env.overlap_schedule
    assert from_env.disable_grammar_support
    monkeypatch.setenv("DISABLE_PREFIX_CACHING", "0")
    assert resolve(*flags).enable_prefix_caching


def test_grammar_compile_timeout_comes_from_the_command_line_or_its_env_var(monkeypatch):
    flags = ("--max-batch-total-tokens", "9000")
    assert resolve(*flags).grammar_compile_timeout == 10.0
    assert resolve(*flags, "--grammar-compile-timeout", "0.5").grammar_compile_timeout == 0.5
    monkeypatch.setenv("GRAMMAR_COMPILE_TIMEOUT", "2")
    assert resolve(*flags).grammar_compile_timeout == 2.0
    with pytest.raises(ValueError, match="--grammar-compile-timeout must be > 0"):
        resolve(*flags, "--grammar-compile-timeout", "0")


def worker_threads(config: ServerConfig) -> int:
    """What worker-0 of ``config`` runs (``tgi_zmq.cpus``, as the worker applies it)."""
    return placement("worker-0", service_cores(), config.num_shard, config.torch_threads).threads


def test_torch_threads_per_worker(monkeypatch):
    flags = ("--max-batch-total-tokens", "9000")
    assert worker_threads(resolve(*flags, "--torch-threads", "3")) == 3
    monkeypatch.setenv("TORCH_THREADS", "2")
    assert resolve(*flags).torch_threads == 2
    monkeypatch.delenv("TORCH_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert worker_threads(resolve(*flags, "--num-shard", "2")) == 3  # 2 cores kept for the pipeline
    with pytest.raises(ValueError, match="--torch-threads must be >= 0"):
        resolve(*flags, "--torch-threads", "-1")


def test_profile_dir_comes_from_the_command_line_or_its_env_var(monkeypatch, tmp_path):
    flags = ("--max-batch-total-tokens", "9000")
    assert resolve(*flags).profile_dir is None  # the profiling routes are off
    monkeypatch.chdir(tmp_path)
    assert resolve(*flags, "--profile-dir", "traces").profile_dir == str(tmp_path / "traces")  # absolute
    monkeypatch.setenv("PROFILE_DIR", "/srv/traces")
    assert resolve(*flags).profile_dir == "/srv/traces"


# TGI's names and ours (README, "Launcher flags"), in --help's order.
FLAGS = """--model-id --served-model-name --quantize --kv-cache-dtype --port --hostname --dtype
--max-input-tokens --max-total-tokens --max-batch-prefill-tokens --max-batch-total-tokens --memory-fraction
--max-concurrent-requests
--max-stop-sequences --max-client-batch-size --max-best-of --max-top-n-tokens --enable-prefill-logprobs
--watermark-gamma --watermark-delta --payload-limit --num-shard --master-addr --master-port
--nnodes --node-rank --torch-threads --replicas --router-policy
--watchdog-timeout --recovery-timeout --chat-template --api-key --body-timeout --sse-keep-alive
--shutdown-timeout
--profile-dir
--disable-prefix-caching --kv-events-endpoint --kv-events-replay-endpoint --kv-events-topic
--disable-overlap-schedule --disable-grammar-support
--grammar-compile-timeout --deterministic""".split()


def test_each_flag_is_one_config_field_listed_by_help_with_its_env_var(capsys, monkeypatch):
    assert [flag for flag, _ in cli.launch_flags()] == FLAGS
    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping (argparse breaks lines at hyphens)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["launch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, field in cli.launch_flags():
        assert f"{flag} " in text and f"[env {cli.env_name(flag)}]" in text
        assert " ".join(field.metadata["help"].split()) in text, flag


def test_flags_keep_their_types_and_defaults(monkeypatch):
    args = cli.build_parser().parse_args(["launch"])
    assert (args.model_id, args.dtype, args.max_total_tokens) == (None, "auto", None)
    assert args.memory_fraction is None
    assert (args.port, args.watermark_gamma, args.enable_prefix_caching) == (8080, 0.5, True)
    args = cli.build_parser().parse_args(["launch", "--port", "81", "--memory-fraction", "0.5"])
    assert (args.port, args.memory_fraction) == (81, 0.5)
    monkeypatch.setenv("MAX_TOTAL_TOKENS", "300")
    monkeypatch.setenv("DTYPE", "bfloat16")
    monkeypatch.setenv("ENABLE_PREFILL_LOGPROBS", "true")
    args = cli.build_parser().parse_args(["launch"])
    assert (args.max_total_tokens, args.dtype, args.enable_prefill_logprobs) == (300, "bfloat16", True)


@pytest.fixture
def fresh_extension(monkeypatch):
    """tgi_zmq.native as if this process had not looked for the extension yet (restored after)."""
    monkeypatch.setattr(native, "_ext", None)
    monkeypatch.setattr(native, "_ext_tried", False)


def test_launch_builds_a_missing_extension(monkeypatch, caplog, fresh_extension):
    built_extension()  # skips without a compiler; then the build below takes seconds
    caplog.set_level("INFO")
    builds = []
    build = native.build
    monkeypatch.setattr(native, "library", lambda: native.BUILD_DIR / "missing.so")
    monkeypatch.setattr(native, "build", lambda: builds.append(1) or build())
    kernels = cli.prepare_kernels("cpu")
    assert builds == [1] and kernels.startswith("native ")
    assert "building the C++ extension" in caplog.text and f"kernels: {kernels}" in caplog.text
    assert cli.prepare_kernels("cuda") == "torch cuda" and builds == [1]  # the extension is CPU-only


def test_launch_without_a_compiler_goes_on_with_the_fallbacks(monkeypatch, tmp_path, caplog, fresh_extension):
    broken = tmp_path / "module.cpp"
    broken.write_text("#error no compiler here\n")
    monkeypatch.setattr(native, "SOURCES", [broken])
    monkeypatch.setattr(native, "BUILD_DIR", tmp_path / "build")
    assert cli.prepare_kernels("cpu") == "torch fallback"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("failed" in w for w in warnings) and any("kernels: torch fallback" in w for w in warnings)


def test_deterministic_is_on_by_default_with_float_weights_and_asked_for_with_quantized_ones(
    tiny_models, caplog
):
    built_extension()
    flags = ("--max-batch-total-tokens", "9000")
    native_kernels = "native avx512"
    assert cli.batch_invariant(resolve(*flags, "--dtype", "bfloat16"), native_kernels)
    assert cli.batch_invariant(resolve(*flags, "--dtype", "float32"), native_kernels)
    assert not cli.batch_invariant(resolve(*flags, "--deterministic", "off"), native_kernels)
    quantized = ("--quantize", "eetq", "--dtype", "bfloat16")
    assert not cli.batch_invariant(resolve(*flags, *quantized), native_kernels)  # prefill is slower
    assert cli.batch_invariant(resolve(*flags, *quantized, "--deterministic", "on"), native_kernels)
    # asked where it cannot hold: off, and the log says why
    assert not cli.batch_invariant(resolve(*flags, "--deterministic", "on"), "torch fallback")
    bloom = resolve(
        "--model-id", str(tiny_models("bloom", smol_tokenizer=True)), *flags, "--deterministic", "on"
    )
    assert not cli.batch_invariant(bloom, native_kernels)
    assert "the C++ kernels do not load (torch fallback)" in caplog.text
    assert "BloomModel is not (Llama-family models are)" in caplog.text
    with pytest.raises(ValueError, match="--deterministic always: choose auto, on or off"):
        resolve(*flags, "--deterministic", "always")
