"""``tgi-zmq launch`` (TGI's launcher flags, run under supervisord) and ``tgi-zmq convert``."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import NoneType
from typing import Any

from tgi_zmq import nodes, replicas
from tgi_zmq.config import DEFAULT_MEMORY_FRACTION, DEFAULT_PREFILL_TOKENS, RUNTIME_DIR_ENV, ServerConfig
from tgi_zmq.dtypes import CONVERTED, SERVED
from tgi_zmq.machine import cpu_has_bf16
from tgi_zmq.quant import KV_CACHE_DTYPES, check_kv_cache_dtype
from tgi_zmq.runtime import PR_SET_PDEATHSIG

log = logging.getLogger("launcher")
REPO_ROOT = Path(__file__).resolve().parent.parent
SUPERVISORD_CONF = REPO_ROOT / "supervisord.conf"
REPLICAS_CONF = REPO_ROOT / "supervisord-replicas.conf"  # --replicas: the replicas and SMG
NODE_CONF = REPO_ROOT / "supervisord-node.conf"  # --nnodes, a node other than 0: its ranks and agent


def launch_flags() -> Iterator[tuple[str, dataclasses.Field]]:
    """Each launcher flag with the ``ServerConfig`` field that declares it (``config.flag``)."""
    for field in dataclasses.fields(ServerConfig):
        if "help" in field.metadata:
            yield field.metadata["flag"] or "--" + field.name.replace("_", "-"), field


def env_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").upper()


def env_default(flag: str, kind: type, default: Any) -> Any:
    """The flag's default, or the value of its environment variable when that is set (a bool flag's
    variable turns its field's default over with "1" or "true")."""
    env = os.environ.get(env_name(flag))
    if not env:
        return default
    return default != (env.lower() in ("1", "true")) if kind is bool else kind(env)


def add_launch_flags(parser: argparse.ArgumentParser) -> None:
    """One argument per flag field: the field's type, help and default (a derived field's flag: its
    ``launch_default``), each read from its environment variable too."""
    hints = typing.get_type_hints(ServerConfig)
    for flag, field in launch_flags():
        hint = hints[field.name]
        kind = next(t for t in typing.get_args(hint) or [hint] if t is not NoneType)  # str | None: str
        default = field.metadata["launch_default"] if field.metadata["derived"] else field.default
        value, text = env_default(flag, kind, default), f"{field.metadata['help']} [env {env_name(flag)}]"
        if kind is bool:
            action = "store_false" if field.default else "store_true"
            parser.add_argument(flag, dest=field.name, action=action, default=value, help=text)
        elif typing.get_origin(hint) is tuple:  # NAME [NAME ...]; its variable: names apart by spaces
            value = value.split() if isinstance(value, str) else value
            parser.add_argument(flag, dest=field.name, nargs="+", metavar="NAME", default=value, help=text)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=value, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgi-zmq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_launch_flags(sub.add_parser("launch", help="start the service (supervisord in the foreground)"))
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
    runtime_dir = tempfile.mkdtemp(prefix="tgi-zmq-")
    try:
        # another node of --nnodes takes node 0's configuration
        resolve = join_node0 if args.node_rank > 0 else resolve_config
        config = resolve(args, runtime_dir)
    except ValueError as exc:
        log.error("%s", exc)
        shutil.rmtree(runtime_dir, ignore_errors=True)  # refused: nothing started, nothing left
        return 2
    kernels = prepare_kernels(config.device)
    if config.node_rank > 0:  # its ranks keep node 0's batch invariance
        code = run_supervisord(dataclasses.replace(config, kernels=kernels), NODE_CONF, ready=None)
    else:
        invariant = batch_invariant(config, kernels)
        config = dataclasses.replace(config, kernels=kernels, batch_invariant=invariant)
        if config.replicas > 1:
            code = run_supervisord(config, REPLICAS_CONF, replicas.prepare(config), replicas.ready)
        else:
            code = run_supervisord(config)
    # Every process is stopped and the runtime dir removed: skip the interpreter's teardown, seconds
    # of garbage collection over what sizing the KV cache imported (torch, the model's classes).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------------------- configuration


def resolve_config(args: argparse.Namespace, runtime_dir: str) -> ServerConfig:
    """The flags as given, then the fields derived from them, the model and the machine; checked."""
    from tgi_zmq.convert import DEFAULT_MODEL_NAME, ensure_default_model
    from tgi_zmq.models import architecture, launch_rules
    from tgi_zmq.parallel import Shard

    model_dir = model_folder(args.model_id) if args.model_id else ensure_default_model()
    if not (model_dir / "config.json").exists():
        raise ValueError(f"--model-id {model_dir}: no config.json there (a local model folder is needed)")
    hf_config = json.loads((model_dir / "config.json").read_text())
    config_cls, _ = architecture(hf_config)  # refuses an unsupported model before any process starts
    given = {
        field.name: getattr(args, field.name) for _, field in launch_flags() if not field.metadata["derived"]
    }
    names = served_model_names(args.served_model_names, str(args.model_id or DEFAULT_MODEL_NAME))
    config = ServerConfig(str(model_dir), names, runtime_dir, **given)
    check_flags(config)
    if config.num_shard > 1:  # refuse a head split the workers could not make (they would fail at load)
        model = config_cls.from_hf(hf_config)
        Shard(0, config.num_shard).heads(model.num_heads, model.num_kv_heads)
    device = pick_device()
    dtype = pick_dtype(args.dtype, device)
    quantize = pick_quantize(args.quantize, model_dir, device)
    if args.kv_cache_dtype:
        check_kv_cache_dtype(args.kv_cache_dtype, device)
    batch_total = args.max_batch_total_tokens
    if not batch_total:  # sized from the free memory, which --replicas share (check_flags: at least 1)
        batch_total = kv_budget(model_dir, hf_config, dtype, device, args) // args.replicas
    rules = launch_rules(model_dir, hf_config)
    context = min(rules.context, tokenizer_max_length(model_dir))
    # A windowed model's pool keeps one page as the null page (tgi_zmq.block_manager). An encoder-decoder
    # request holds two page tables (decoder and encoder), each with a partly filled page.
    cache = batch_total - (config.block_size if rules.kv_window else 0)
    pool = cache - (2 * config.block_size if rules.decoder_start_token_id is not None else 0)
    total = args.max_total_tokens or min(context, pool)
    max_input = args.max_input_tokens or total - 1
    check_limits(max_input, total, cache, explicit_budget=bool(args.max_batch_total_tokens))
    return dataclasses.replace(
        config,
        dtype=dtype,
        device=device,
        quantize=quantize,
        kv_cache_dtype=args.kv_cache_dtype or None,
        max_input_tokens=max_input,
        max_total_tokens=total,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens or min(DEFAULT_PREFILL_TOKENS, batch_total),
        max_batch_total_tokens=batch_total,
        eos_token_ids=rules.eos_token_ids,
        vocab_size=hf_config.get("vocab_size"),
        decoder_start_token_id=rules.decoder_start_token_id,
        kv_window=rules.kv_window,
        api_key=args.api_key or None,
        chat_template=read_chat_template(args.chat_template),
        profile_dir=str(Path(args.profile_dir).expanduser().resolve()) if args.profile_dir else None,
    )


def join_node0(args: argparse.Namespace, runtime_dir: str) -> ServerConfig:
    """A node other than 0: node 0's configuration (``nodes``) with this node's place; the flags that
    size the group (``--num-shard``, the limits) are node 0's."""
    nodes.check_place(args.node_rank, args.nnodes)
    log.info(
        "node %d of %d: asking node 0 at %s for its configuration",
        args.node_rank,
        args.nnodes,
        args.master_addr,
    )
    node0 = nodes.join(args.node_rank, args.master_addr, args.master_port)
    config = dataclasses.replace(
        nodes.node_config(node0, args.node_rank, args.nnodes, args.master_addr), runtime_dir=runtime_dir
    )
    nodes.check(config)
    if not Path(config.model_id).exists():
        raise ValueError(f"node 0 serves {config.model_id}: every node needs the model at the same path")
    return config


def read_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's text, or the value itself when it is a template (has ``{{`` or
    ``{%``), as vLLM reads it; anything else is a launch error."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r}: no such file, and not a Jinja template")


def check_flags(config: ServerConfig) -> None:
    """Refuse values the processes could not run with, before any starts."""
    if config.num_shard < 1:
        raise ValueError("--num-shard must be at least 1")
    if config.torch_threads < 0:
        raise ValueError("--torch-threads must be >= 0 (0: the cores divided by --num-shard)")
    if config.watchdog_timeout <= 0 or config.recovery_timeout <= 0:
        raise ValueError("--watchdog-timeout and --recovery-timeout must be > 0")
    if config.body_timeout <= 0 or config.shutdown_timeout < 0:
        raise ValueError("--body-timeout must be > 0 and --shutdown-timeout >= 0")
    if config.sse_keep_alive < 0:
        raise ValueError("--sse-keep-alive must be >= 0 (0: no keep-alive comments)")
    if config.grammar_compile_timeout <= 0:
        raise ValueError("--grammar-compile-timeout must be > 0")
    if config.deterministic not in ("auto", "on", "off"):
        raise ValueError(f"--deterministic {config.deterministic}: choose auto, on or off")
    check_kv_events(config)
    replicas.check(config)
    nodes.check(config)


def check_kv_events(config: ServerConfig) -> None:
    for flag, endpoint in (
        ("--kv-events-endpoint", config.kv_events_endpoint),
        ("--kv-events-replay-endpoint", config.kv_events_replay_endpoint),
    ):
        if endpoint is not None and not endpoint.startswith(("tcp://", "ipc://")):
            raise ValueError(f"{flag} {endpoint}: a ZeroMQ address, tcp://HOST:PORT or ipc://PATH")
    if config.kv_events_replay_endpoint and not config.kv_events_endpoint:
        raise ValueError("--kv-events-replay-endpoint replays the events of --kv-events-endpoint: give both")
    if config.kv_events_endpoint and not config.enable_prefix_caching:
        raise ValueError("KV events describe the prefix cache: drop --disable-prefix-caching")


def batch_invariant(config: ServerConfig, kernels: str) -> bool:
    """Whether the steps are batch-invariant (``--deterministic``): asked (auto: float weights, where it
    costs nothing measured) and able to hold here; a warning says why not when it was asked."""
    from tgi_zmq.models import architecture

    if config.deterministic == "off" or (config.deterministic == "auto" and config.quantize):
        return False
    _, model_cls = architecture(json.loads((Path(config.model_id) / "config.json").read_text()))
    reasons = [
        (config.device != "cpu", "it needs the CPU"),
        (not kernels.startswith("native"), f"the C++ kernels do not load ({kernels})"),
        (not model_cls.batch_invariant, f"{model_cls.__name__} is not (Llama-family models are)"),
        (config.dtype not in ("float32", "bfloat16"), f"--dtype {config.dtype} (float32 and bfloat16 are)"),
        (bool(config.kv_cache_dtype), "--kv-cache-dtype (the KV pages must stay in the model's dtype)"),
    ]
    why = [reason for failed, reason in reasons if failed]
    if why and config.deterministic == "on":
        log.warning("--deterministic on cannot hold: %s", "; ".join(why))
    return not why


def prepare_kernels(device: str) -> str:
    """Which kernels the workers will run (``native.describe``), said in the launch log's first lines:
    the C++ extension's, built here when missing (seconds; ``scripts/setup`` builds it too), or torch's
    (no compiler, a broken build: about half the decode speed)."""
    from tgi_zmq import native

    if device == "cpu" and not native.library().exists():
        log.info("building the C++ extension (csrc/ into %s): once, seconds", native.BUILD_DIR)
        native.build()
    kernels = native.describe(device)
    if kernels == "torch fallback":
        log.warning(
            "kernels: torch fallback, without the C++ extension (see above): decode at half the speed or less"
        )
    else:
        log.info("kernels: %s", kernels)
    return kernels


def kv_budget(model_dir: Path, hf_config: dict, dtype: str, device: str, args: argparse.Namespace) -> int:
    from tgi_zmq.memory import kv_budget_tokens

    fraction = args.memory_fraction or DEFAULT_MEMORY_FRACTION[device]
    kv_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype] if args.kv_cache_dtype else None
    here = range(args.num_shard // args.nnodes)  # --nnodes: node 0 sizes the cache from its own ranks
    tokens = kv_budget_tokens(model_dir, hf_config, dtype, device, fraction, args.num_shard, kv_dtype, here)
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


def served_model_names(given: list[str] | None, model_name: str) -> tuple[str, ...]:
    """``--served-model-name`` as given (each once, in order), or the model's name and TGI's "tgi"."""
    names = tuple(dict.fromkeys(given or (model_name, "tgi")))
    if not all(name.strip() for name in names):
        raise ValueError("--served-model-name: a name cannot be empty")
    return names


def model_folder(model_id: str) -> Path:
    """The folder ``--model-id`` names; a .gguf file gets a folder of its config and tokenizer."""
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"--model-id {model_id}: no such GGUF file")
        from tgi_zmq.convert import prepare_gguf_folder

        return prepare_gguf_folder(path)
    return path


def pick_quantize(requested: str | None, model_dir: Path, device: str) -> str | None:
    """The ``--quantize`` value served: the one asked if this device runs it and the checkpoint allows
    it; a GPTQ/AWQ checkpoint's own method when none is asked; "gguf" for a GGUF file."""
    from tgi_zmq.checkpoint.gguf_file import is_gguf_folder
    from tgi_zmq.checkpoint.gptq import read_quant_config
    from tgi_zmq.quant import check_quantize

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


# ---------------------------------------------------------------------------- supervisord


def supervisord_invocation(config: ServerConfig, conf: Path = SUPERVISORD_CONF) -> tuple[list[str], dict]:
    """The command line and environment of a service's supervisord (its config saved first)."""
    os.chmod(config.runtime_dir, 0o700)
    config.save()
    env = dict(os.environ)
    env.update(
        {
            RUNTIME_DIR_ENV: config.runtime_dir,
            "TGI_ZMQ_PYTHON": sys.executable,
            "TGI_ZMQ_NUM_SHARD": str(len(config.local_ranks)),  # this node's ranks
            "TGI_ZMQ_FIRST_RANK": str(config.local_ranks.start),
            # supervisord stops the frontend first: let it drain before SIGKILL
            "TGI_ZMQ_FRONTEND_STOPWAIT": str(int(config.shutdown_timeout) + 10),
        }
    )
    return [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)], env


def healthy(config: ServerConfig) -> bool:
    try:
        with urllib.request.urlopen(config.local_url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def run_supervisord(
    config: ServerConfig,
    conf: Path = SUPERVISORD_CONF,
    env: dict[str, str] | None = None,
    ready: Callable[[ServerConfig], bool] | None = healthy,
) -> int:
    """Run every process under supervisord in the foreground; SIGTERM / Ctrl-C stop them all, as does
    this process's death (its supervisord is told by the kernel). ``ready`` says when to log that the
    service is ready (None: a node without HTTP)."""
    from tgi_zmq.transport import remove_stale

    argv, supervisord_env = supervisord_invocation(config, conf)
    log.info(
        "runtime dir %s; model %s (%s on %s)",
        config.runtime_dir,
        config.model_id,
        config.dtype,
        config.device,
    )
    child = subprocess.Popen(
        argv, env=supervisord_env | (env or {}), start_new_session=True, preexec_fn=_terminated_with_parent
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: child.send_signal(signal.SIGTERM))
    if ready is not None:
        threading.Thread(target=announce_ready, args=(config, child, ready), daemon=True).start()
    try:
        return child.wait()
    finally:
        for path in sorted(Path(config.runtime_dir).glob("**/config.json")):
            remove_stale(ServerConfig.load(str(path.parent)).shm_prefix)  # a replica's too
        shutil.rmtree(config.runtime_dir, ignore_errors=True)


def _terminated_with_parent() -> None:
    """In supervisord's process before it starts: SIGTERM when the launcher dies (even by kill -9)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def announce_ready(
    config: ServerConfig, child: subprocess.Popen, ready: Callable[[ServerConfig], bool]
) -> None:
    while child.poll() is None:
        if ready(config):
            log.info("service ready at %s", config.local_url)
            return
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
