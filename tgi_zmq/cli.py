"""``tgi-zmq launch`` (TGI's launcher flags, run under supervisord) and ``tgi-zmq convert``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tgi_zmq.config import DEFAULT_MEMORY_FRACTION, DEFAULT_PREFILL_TOKENS, RUNTIME_DIR_ENV, ServerConfig
from tgi_zmq.dtypes import CONVERTED, SERVED
from tgi_zmq.machine import cpu_has_bf16
from tgi_zmq.quant import KV_CACHE_DTYPES, check_kv_cache_dtype

log = logging.getLogger("launcher")
REPO_ROOT = Path(__file__).resolve().parent.parent
SUPERVISORD_CONF = REPO_ROOT / "supervisord.conf"

# (flag, type, default, help). Defaults are ServerConfig's own; None: derived at launch, as the help says.
# Each flag is also read from its upper-case environment variable, as in TGI; a bool flag's variable turns
# it on with "1" or "true".
LAUNCH_FLAGS: list[tuple[str, type, Any, str]] = [
    (
        "--model-id",
        str,
        None,
        "local folder with config.json, tokenizer files and *.safetensors, or a .gguf file served as it "
        "is (its quantized blocks repacked, its tokenizer and chat template) "
        "(default: the bundled SmolLM2-135M-Instruct, converted once from its GGUF)",
    ),
    (
        "--quantize",
        str,
        None,
        "bitsandbytes | eetq (8-bit weights) | bitsandbytes-nf4 | bitsandbytes-fp4 (4-bit) | gptq | awq "
        "(a pre-quantized checkpoint; found from its config.json when left out) | fp8 (CUDA, compute "
        "capability 8.9+). A value the device cannot run is refused. A .gguf keeps its own quantization",
    ),
    (
        "--kv-cache-dtype",
        str,
        None,
        "fp8_e5m2 | fp8_e4m3fn: KV cache entries in 8-bit floats (half of bfloat16's memory, a quarter "
        "of float32's), cast back to the model's dtype when read (default: the model's dtype)",
    ),
    ("--port", int, ServerConfig.port, "HTTP port"),
    ("--hostname", str, ServerConfig.hostname, "HTTP bind address"),
    (
        "--dtype",
        str,
        "auto",
        "float32 | bfloat16 | float16 | auto. auto: on CUDA bfloat16 (float16 without "
        "bf16 support); on CPU bfloat16 when the CPU has native bf16 matmul (AVX512-BF16 or AMX), else "
        "float32. float16 on a CPU has no fast path and is refused.",
    ),
    ("--max-input-tokens", int, None, "longest prompt in tokens (default: max-total-tokens - 1)"),
    (
        "--max-total-tokens",
        int,
        None,
        "prompt + new tokens per request (default: the model's context "
        "length, capped by max-batch-total-tokens)",
    ),
    (
        "--max-batch-prefill-tokens",
        int,
        None,
        "prompt tokens per forward step: longer prompts are split into chunks. Beside running decodes a "
        "chunk gets fewer, sized from the measured step times so that the streams' step costs at most "
        f"~2.5 decode steps (default {DEFAULT_PREFILL_TOKENS['cpu']} on CPU, "
        f"{DEFAULT_PREFILL_TOKENS['cuda']} on GPU)",
    ),
    (
        "--max-batch-total-tokens",
        int,
        None,
        "KV-cache size in tokens, all requests together (default: what --memory-fraction of the memory "
        "left after the weights holds)",
    ),
    (
        "--memory-fraction",
        float,
        None,
        "share of the memory left free after the weights that the KV cache may take when "
        f"--max-batch-total-tokens is not given (default: {DEFAULT_MEMORY_FRACTION['cuda']} of free GPU "
        f"memory; {DEFAULT_MEMORY_FRACTION['cpu']} of available RAM on CPU, mapped lazily)",
    ),
    (
        "--max-concurrent-requests",
        int,
        ServerConfig.max_concurrent_requests,
        "requests in flight before answering 429",
    ),
    ("--max-stop-sequences", int, ServerConfig.max_stop_sequences, "stop sequences per request"),
    (
        "--max-client-batch-size",
        int,
        ServerConfig.max_client_batch_size,
        "prompts per /v1/completions request",
    ),
    ("--max-best-of", int, ServerConfig.max_best_of, "the largest `best_of` (and OpenAI `n`) allowed"),
    (
        "--max-top-n-tokens",
        int,
        ServerConfig.max_top_n_tokens,
        "the largest `top_n_tokens` (OpenAI `top_logprobs`, completions `logprobs`)",
    ),
    (
        "--enable-prefill-logprobs",
        bool,
        ServerConfig.enable_prefill_logprobs,
        "score the prompt's tokens when asked (`decoder_input_details`, completions `echo` with "
        "`logprobs`): such requests skip the prefix cache; off, their `prefill` is empty as in TGI",
    ),
    (
        "--watermark-gamma",
        float,
        ServerConfig.watermark_gamma,
        "`watermark`: the share of the vocabulary in each green list",
    ),
    (
        "--watermark-delta",
        float,
        ServerConfig.watermark_delta,
        "`watermark`: the bias added to green-list logits",
    ),
    ("--payload-limit", int, ServerConfig.payload_limit, "request body limit in bytes (413 above)"),
    (
        "--num-shard",
        int,
        ServerConfig.num_shard,
        "tensor-parallel worker processes: each holds 1/N of every weight (gloo on CPU, NCCL on CUDA)",
    ),
    (
        "--master-addr",
        str,
        ServerConfig.master_addr,
        "address of rank 0 for the ranks' process group (--num-shard > 1)",
    ),
    (
        "--master-port",
        int,
        ServerConfig.master_port,
        "port of rank 0 for the ranks' process group (--num-shard > 1)",
    ),
    (
        "--torch-threads",
        int,
        ServerConfig.torch_threads,
        "torch threads per worker process (default 0: the machine's cores divided by --num-shard)",
    ),
    (
        "--watchdog-timeout",
        float,
        ServerConfig.watchdog_timeout,
        "seconds a forward step may take (plus 5 ms per token in it) before the workers count as hung: "
        "they are killed and restarted, and their requests recompute",
    ),
    (
        "--recovery-timeout",
        float,
        ServerConfig.recovery_timeout,
        "seconds in-flight requests wait for a faulty pipeline to become healthy again before they fail "
        "with 503",
    ),
    (
        "--api-key",
        str,
        ServerConfig.api_key,
        "require the header 'Authorization: Bearer <key>' on every route but /health, /ping, GET / and "
        "/metrics (401 otherwise)",
    ),
    (
        "--body-timeout",
        float,
        ServerConfig.body_timeout,
        "seconds a request body may take to arrive (408 after)",
    ),
    (
        "--shutdown-timeout",
        float,
        ServerConfig.shutdown_timeout,
        "on SIGTERM, seconds to wait for the requests in flight while /health and new requests get 503",
    ),
    (
        "--profile-dir",
        str,
        ServerConfig.profile_dir,
        "enable POST /start_profile and /stop_profile (404 without it): torch.profiler traces of the "
        "workers' steps go to this folder (worker-<rank>-<time>.trace.json, for Perfetto or "
        "chrome://tracing); see scripts/profile",
    ),
    (
        "--disable-prefix-caching",
        bool,
        not ServerConfig.enable_prefix_caching,
        "do not reuse the KV pages of shared prompt prefixes",
    ),
    (
        "--disable-overlap-schedule",
        bool,
        not ServerConfig.overlap_schedule,
        "build each step only after the previous one returned",
    ),
    (
        "--disable-grammar-support",
        bool,
        ServerConfig.disable_grammar_support,
        "refuse `grammar` and `response_format` (structured output) with a 422, as TGI's flag",
    ),
    (
        "--grammar-compile-timeout",
        float,
        ServerConfig.grammar_compile_timeout,
        "seconds a request's grammar may take to compile; one that takes longer is refused with a 422",
    ),
]


def env_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").upper()


def env_default(flag: str, kind: type, default: Any) -> Any:
    """The flag's default, or the value of its environment variable when that is set."""
    env = os.environ.get(env_name(flag))
    if not env:
        return default
    return env.lower() in ("1", "true") if kind is bool else kind(env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgi-zmq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    launch = sub.add_parser("launch", help="start the service (supervisord in the foreground)")
    for flag, kind, default, text in LAUNCH_FLAGS:
        value, text = env_default(flag, kind, default), f"{text} [env {env_name(flag)}]"
        if kind is bool:
            launch.add_argument(flag, action="store_true", default=value, help=text)
        else:
            launch.add_argument(flag, type=kind, default=value, help=text)
    convert = sub.add_parser("convert", help="turn a GGUF or .bin checkpoint into a safetensors folder")
    convert.add_argument("source", help="a .gguf, 'default' (bundled SmolLM2), a *.bin or its folder")
    convert.add_argument("--out", help="output folder (default: in the tgi-zmq cache)")
    convert.add_argument("--dtype", choices=CONVERTED, help="GGUF: float32; .bin: unchanged")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s launcher %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from tgi_zmq.convert import convert_command

        try:
            convert_command(args.source, args.out, args.dtype)
        except (ValueError, FileNotFoundError) as exc:
            log.error("%s", exc)
            return 2
        return 0
    try:
        config = resolve_config(args, tempfile.mkdtemp(prefix="tgi-zmq-"))
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    return run_supervisord(config)


# ---------------------------------------------------------------------------- configuration


def resolve_config(args: argparse.Namespace, runtime_dir: str) -> ServerConfig:
    """Fill the defaults that depend on the model and the machine, and check the limits."""
    from tgi_zmq.convert import DEFAULT_MODEL_NAME, ensure_default_model
    from tgi_zmq.models import architecture, launch_rules
    from tgi_zmq.parallel import Shard

    model_dir = model_folder(args.model_id) if args.model_id else ensure_default_model()
    if not (model_dir / "config.json").exists():
        raise ValueError(f"--model-id {model_dir}: no config.json there (a local model folder is needed)")
    hf_config = json.loads((model_dir / "config.json").read_text())
    config_cls, _ = architecture(hf_config)  # refuses an unsupported model before any process starts
    if args.num_shard < 1:
        raise ValueError("--num-shard must be at least 1")
    if args.torch_threads < 0:
        raise ValueError("--torch-threads must be >= 0 (0: the cores divided by --num-shard)")
    if args.watchdog_timeout <= 0 or args.recovery_timeout <= 0:
        raise ValueError("--watchdog-timeout and --recovery-timeout must be > 0")
    if args.body_timeout <= 0 or args.shutdown_timeout < 0:
        raise ValueError("--body-timeout must be > 0 and --shutdown-timeout >= 0")
    if args.grammar_compile_timeout <= 0:
        raise ValueError("--grammar-compile-timeout must be > 0")
    if args.num_shard > 1:  # refuse a head split the workers could not make (they would fail at load)
        model = config_cls.from_hf(hf_config)
        Shard(0, args.num_shard).heads(model.num_heads, model.num_kv_heads)
    device = pick_device()
    dtype = pick_dtype(args.dtype, device)
    quantize = pick_quantize(args.quantize, model_dir, device)
    if args.kv_cache_dtype:
        check_kv_cache_dtype(args.kv_cache_dtype, device)
    batch_total = args.max_batch_total_tokens or kv_budget(model_dir, hf_config, dtype, device, args)
    rules = launch_rules(model_dir, hf_config)
    context = min(rules.context, tokenizer_max_length(model_dir))
    window = rules.sliding_window
    if window and args.max_total_tokens and args.max_total_tokens > window:
        raise ValueError(
            f"--max-total-tokens {args.max_total_tokens} is beyond the model's sliding window ({window}), "
            "which is not implemented: keep it at or below the window"
        )
    # An encoder-decoder request holds two page tables (decoder and encoder), each with a partly filled page.
    pool = batch_total - (2 * ServerConfig.block_size if rules.decoder_start_token_id is not None else 0)
    total = args.max_total_tokens or min(context, pool, window or context)
    max_input = args.max_input_tokens or total - 1
    check_limits(max_input, total, batch_total, explicit_budget=bool(args.max_batch_total_tokens))
    return ServerConfig(
        model_id=str(model_dir),
        served_model_name=DEFAULT_MODEL_NAME if not args.model_id else str(args.model_id),
        runtime_dir=runtime_dir,
        hostname=args.hostname,
        port=args.port,
        dtype=dtype,
        device=device,
        quantize=quantize,
        kv_cache_dtype=args.kv_cache_dtype or None,
        max_input_tokens=max_input,
        max_total_tokens=total,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens
        or min(DEFAULT_PREFILL_TOKENS[device], batch_total),
        max_batch_total_tokens=batch_total,
        max_concurrent_requests=args.max_concurrent_requests,
        max_stop_sequences=args.max_stop_sequences,
        max_client_batch_size=args.max_client_batch_size,
        max_best_of=args.max_best_of,
        max_top_n_tokens=args.max_top_n_tokens,
        enable_prefill_logprobs=args.enable_prefill_logprobs,
        watermark_gamma=args.watermark_gamma,
        watermark_delta=args.watermark_delta,
        payload_limit=args.payload_limit,
        num_shard=args.num_shard,
        master_addr=args.master_addr,
        master_port=args.master_port,
        torch_threads=args.torch_threads,
        enable_prefix_caching=not args.disable_prefix_caching,
        overlap_schedule=not args.disable_overlap_schedule,
        disable_grammar_support=args.disable_grammar_support,
        grammar_compile_timeout=args.grammar_compile_timeout,
        eos_token_ids=rules.eos_token_ids,
        vocab_size=hf_config.get("vocab_size"),
        decoder_start_token_id=rules.decoder_start_token_id,
        watchdog_timeout=args.watchdog_timeout,
        recovery_timeout=args.recovery_timeout,
        api_key=args.api_key or None,
        body_timeout=args.body_timeout,
        shutdown_timeout=args.shutdown_timeout,
        profile_dir=str(Path(args.profile_dir).expanduser().resolve()) if args.profile_dir else None,
    )


def kv_budget(model_dir: Path, hf_config: dict, dtype: str, device: str, args: argparse.Namespace) -> int:
    from tgi_zmq.memory import kv_budget_tokens

    fraction = args.memory_fraction or DEFAULT_MEMORY_FRACTION[device]
    kv_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype] if args.kv_cache_dtype else None
    tokens = kv_budget_tokens(model_dir, hf_config, dtype, device, fraction, args.num_shard, kv_dtype)
    log.info(
        "KV cache: %d tokens fit in %.0f%% of the free %s memory left to each rank (--num-shard %d)",
        tokens,
        fraction * 100,
        device,
        args.num_shard,
    )
    return tokens


def tokenizer_max_length(model_dir: Path) -> int:
    path = model_dir / "tokenizer_config.json"
    length = json.loads(path.read_text()).get("model_max_length") if path.exists() else None
    return length if isinstance(length, int) and 0 < length < 10**9 else 10**9


def check_limits(max_input: int, total: int, batch_total: int, explicit_budget: bool) -> None:
    if max_input >= total:
        raise ValueError(f"--max-input-tokens ({max_input}) must be < --max-total-tokens ({total})")
    if total > batch_total:
        raise ValueError(
            f"one request of --max-total-tokens={total} does not fit in a KV cache of {batch_total} tokens"
            + (" (--max-batch-total-tokens)" if explicit_budget else " (what the free memory holds)")
            + ": lower --max-total-tokens"
            + (" or raise --max-batch-total-tokens" if explicit_budget else " or raise --memory-fraction")
        )


def model_folder(model_id: str) -> Path:
    """The folder ``--model-id`` names; a .gguf file gets a folder of its config and tokenizer."""
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"--model-id {model_id}: no such GGUF file")
        from tgi_zmq.quant.gguf import prepare_gguf_folder

        return prepare_gguf_folder(path)
    return path


def pick_quantize(requested: str | None, model_dir: Path, device: str) -> str | None:
    """The ``--quantize`` value served: the one asked if this device runs it and the checkpoint allows
    it; a GPTQ/AWQ checkpoint's own method when none is asked; "gguf" for a GGUF file."""
    from tgi_zmq.quant import check_quantize
    from tgi_zmq.quant.gguf import is_gguf_folder
    from tgi_zmq.quant.gptq import read_quant_config

    if is_gguf_folder(model_dir):
        if requested:
            raise ValueError(
                f"--quantize {requested}: a GGUF file is served in its own quantization; leave it out"
            )
        return "gguf"
    if requested:
        check_quantize(requested, device, cuda_capability() if device == "cuda" else None)
    own = read_quant_config(model_dir)
    if own is not None and requested not in (None, own.method):
        raise ValueError(f"--quantize {requested}: {model_dir} is a {own.method} checkpoint; leave it out")
    if own is None and requested in ("gptq", "awq"):
        raise ValueError(
            f"--quantize {requested} needs a {requested} checkpoint; {model_dir}/config.json has no "
            f"quantization_config with quant_method {requested!r}"
        )
    return own.method if own is not None else requested


def cuda_capability() -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability()


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(requested: str, device: str) -> str:
    if requested not in ("auto", *SERVED):
        raise ValueError(f"--dtype {requested}: choose {', '.join(SERVED)} or auto")
    if requested == "float16" and device == "cpu":
        raise ValueError("--dtype float16 has no fast path on this CPU; use bfloat16 or float32")
    if requested != "auto":
        return requested
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_bf16() else "float32"


def eos_token_ids(model_dir: Path, hf_config: dict) -> tuple[int, ...]:
    """The checkpoint's EOS ids (the rule lives with the models: ``tgi_zmq.models.eos_token_ids``)."""
    from tgi_zmq import models

    return models.eos_token_ids(model_dir, hf_config)


# ---------------------------------------------------------------------------- supervisord


def run_supervisord(config: ServerConfig) -> int:
    """Run every process under supervisord in the foreground; SIGTERM / Ctrl-C stop them all."""
    from tgi_zmq.transport import remove_stale

    os.chmod(config.runtime_dir, 0o700)
    config.save()
    env = dict(os.environ)
    env.update(
        {
            RUNTIME_DIR_ENV: config.runtime_dir,
            "TGI_ZMQ_PYTHON": sys.executable,
            "TGI_ZMQ_NUM_SHARD": str(config.num_shard),
            # supervisord stops the frontend first: let it drain before SIGKILL
            "TGI_ZMQ_FRONTEND_STOPWAIT": str(int(config.shutdown_timeout) + 10),
        }
    )
    log.info(
        "runtime dir %s; model %s (%s on %s)",
        config.runtime_dir,
        config.model_id,
        config.dtype,
        config.device,
    )
    child = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(SUPERVISORD_CONF)],
        env=env,
        start_new_session=True,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: child.send_signal(signal.SIGTERM))
    threading.Thread(target=announce_ready, args=(config, child), daemon=True).start()
    try:
        return child.wait()
    finally:
        remove_stale(config.shm_prefix)
        for path in Path(config.runtime_dir).iterdir():
            path.unlink(missing_ok=True)
        Path(config.runtime_dir).rmdir()


def announce_ready(config: ServerConfig, child: subprocess.Popen) -> None:
    host = "127.0.0.1" if config.hostname in ("0.0.0.0", "::") else config.hostname
    url = f"http://{host}:{config.port}/health"
    while child.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    log.info("service ready at http://%s:%d", host, config.port)
                    return
        except OSError:
            pass
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
