"""The one configuration object every process reads, and where the sockets live.

``tgi-zmq launch`` resolves its flags (declared on the fields) into a ``ServerConfig``, writes it as
JSON into a private runtime directory and points every process at it with the
``TGI_ZMQ_RUNTIME_DIR`` environment variable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

RUNTIME_DIR_ENV = "TGI_ZMQ_RUNTIME_DIR"

# Timing the processes must agree on, in one place.
HEARTBEAT_SECONDS = 0.5  # every pipeline process -> frontend
HEARTBEAT_TIMEOUT_S = 3.0  # the frontend counts a process down after this much silence
HUNG_AFTER_S = 10.0  # ... and kills it after this much (stopped or deadlocked)
MONITOR_PERIOD_S = 0.5  # how often the frontend checks for silent processes
STATS_PERIOD_S = 0.5  # scheduler -> frontend statistics
POLL_MS = 100  # an idle process loop wakes at least this often
WORKER_ANNOUNCE_MS = 1000  # an idle worker says again that it is ready
RING_SLOTS = 4  # shared-memory buffers per producer: more than the steps in flight

# Per-request bounds that size a step's buffer (validation refuses more).
MAX_LOGIT_BIAS = 300  # ``logit_bias`` entries
MAX_STOP_TOKEN_IDS = 64  # ``stop_token_ids``
MAX_EOS_TOKEN_IDS = 16  # a model's end-of-sequence ids we ban before ``min_tokens``

# Prompt tokens per forward step (fewer beside running decodes: scheduler.StepCosts sizes those chunks).
DEFAULT_PREFILL_TOKENS = 4096
# --nnodes: node 0's sockets the other nodes' processes reach over TCP, at --master-port plus these.
NODE0_PORTS = {"worker": 1, "frontend": 2}
# Share of the free memory the KV cache takes: of available RAM (mapped lazily), of free GPU memory.
DEFAULT_MEMORY_FRACTION = {"cpu": 0.3, "cuda": 0.9}


def flag(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    derived: bool = False,
    launch_default: Any = None,
    name: str | None = None,
) -> Any:
    """A field that is also a ``tgi-zmq launch`` flag: ``name``, by default ``--`` and the field's name
    with dashes; its environment variable is the flag in upper case (as in TGI). A bool flag turns its
    field's default over. ``derived``: the launcher computes the field, from the flag when given (its
    default is then ``launch_default``) and from the model and the machine."""
    metadata = {"help": help, "derived": derived, "launch_default": launch_default, "flag": name}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything the processes share. The fields declared with ``flag`` are the launcher's flags
    (``cli.build_parser``), in the order ``--help`` lists them; the launcher derives the others."""

    model_id: str = flag(
        help="local folder with config.json, tokenizer files and *.safetensors, or a .gguf file served as "
        "it is (its quantized blocks repacked, its tokenizer and chat template) "
        "(default: the bundled SmolLM2-135M-Instruct, converted once from its GGUF)",
        derived=True,  # the folder served (a .gguf gets one)
    )
    served_model_names: tuple[str, ...] = flag(
        help="the model's names in the API, as vLLM's flag: /v1/models lists each, a response names the "
        "first (requests may name any model, as in TGI); a router that registers one name per worker, as "
        "SMG 1.13 does, takes the first: 'tgi' first puts TGI's examples' name there (default: --model-id "
        "as given, or the default model's name, then 'tgi')",
        derived=True,
        name="--served-model-name",
    )
    runtime_dir: str
    # A --quantize value, "gguf" for a GGUF file, None: dense weights.
    quantize: str | None = flag(
        None,
        "bitsandbytes | eetq (8-bit weights) | bitsandbytes-nf4 | bitsandbytes-fp4 (4-bit) | gptq | awq "
        "(a pre-quantized checkpoint; found from its config.json when left out) | fp8 (CUDA, compute "
        "capability 8.9+). A value the device cannot run is refused. A .gguf keeps its own quantization",
        derived=True,
    )
    kv_cache_dtype: str | None = flag(  # None: the model's dtype
        None,
        "fp8_e5m2 | fp8_e4m3fn: KV cache entries in 8-bit floats (half of bfloat16's memory, a quarter "
        "of float32's), cast back to the model's dtype when read (default: the model's dtype)",
        derived=True,
    )
    port: int = flag(8080, "HTTP port")
    hostname: str = flag("0.0.0.0", "HTTP bind address")
    dtype: str = flag(  # one of dtypes.SERVED
        "float32",
        "float32 | bfloat16 | float16 | auto. auto: on CUDA bfloat16 (float16 without "
        "bf16 support); on CPU bfloat16 when the CPU has native bf16 matmul (AVX512-BF16 or AMX), else "
        "float32. float16 on a CPU has no fast path and is refused.",
        derived=True,
        launch_default="auto",
    )
    # The launcher derives these four from the model, the device and the memory.
    max_input_tokens: int = flag(
        4095, "longest prompt in tokens (default: max-total-tokens - 1)", derived=True
    )
    max_total_tokens: int = flag(
        4096,
        "prompt + new tokens per request (default: the model's context "
        "length, capped by max-batch-total-tokens)",
        derived=True,
    )
    max_batch_prefill_tokens: int = flag(
        DEFAULT_PREFILL_TOKENS,
        "prompt tokens per forward step: longer prompts are split into chunks. Beside running decodes a "
        "chunk gets fewer, sized from the measured step times so that the streams' step costs at most "
        f"~2.5 decode steps (default {DEFAULT_PREFILL_TOKENS})",
        derived=True,
    )
    max_batch_total_tokens: int = flag(
        65536,
        "KV-cache size in tokens, all requests together (default: what --memory-fraction of the memory "
        "left after the weights holds)",
        derived=True,
    )
    memory_fraction: float | None = flag(  # None: DEFAULT_MEMORY_FRACTION of the device
        None,
        "share of the memory left free after the weights that the KV cache may take when "
        f"--max-batch-total-tokens is not given (default: {DEFAULT_MEMORY_FRACTION['cuda']} of free GPU "
        f"memory; {DEFAULT_MEMORY_FRACTION['cpu']} of available RAM on CPU, mapped lazily)",
    )
    max_concurrent_requests: int = flag(128, "requests in flight before answering 429")
    max_stop_sequences: int = flag(4, "stop sequences per request")
    max_client_batch_size: int = flag(4, "prompts per /v1/completions request")
    max_best_of: int = flag(2, "the largest `best_of` (and OpenAI `n`) allowed")
    max_top_n_tokens: int = flag(
        5, "the largest `top_n_tokens` (OpenAI `top_logprobs`, completions `logprobs`)"
    )
    enable_prefill_logprobs: bool = flag(
        False,
        "score the prompt's tokens when asked (`decoder_input_details`, completions `echo` with "
        "`logprobs`): such requests skip the prefix cache; off, their `prefill` is empty as in TGI",
    )
    watermark_gamma: float = flag(0.5, "`watermark`: the share of the vocabulary in each green list")
    watermark_delta: float = flag(2.0, "`watermark`: the bias added to green-list logits")
    payload_limit: int = flag(2_000_000, "request body limit in bytes (413 above)")
    num_shard: int = flag(
        1, "tensor-parallel worker processes: each holds 1/N of every weight (gloo on CPU, NCCL on CUDA)"
    )
    master_addr: str = flag("localhost", "address of rank 0 for the ranks' process group (--num-shard > 1)")
    master_port: int = flag(29500, "port of rank 0 for the ranks' process group (--num-shard > 1)")
    nnodes: int = flag(
        1,
        "hosts the --num-shard ranks are spread over, one launch each: node 0 serves HTTP, runs the "
        "pipeline and its ranks (steps in shared memory); another node runs only its ranks, which take their "
        "steps from node 0 over TCP (--master-port + 1; heartbeats + 2; torch.distributed on --master-port), "
        "and takes node 0's configuration when it joins (docs/scale-out.md)",
    )
    node_rank: int = flag(
        0, "this host's place among --nnodes (0: the one that serves HTTP); others need --master-addr"
    )
    torch_threads: int = flag(  # per worker; 0: by the rule of tgi_zmq.cpus
        0, "torch threads per worker process (default 0: the machine's cores divided by --num-shard)"
    )
    replicas: int = flag(
        1,
        "run N complete services, each on its own share of the cores and on port --port + 1 + i (127.0.0.1), "
        "behind the SMG router on --port; SMG carries the OpenAI routes and /generate (streamed with "
        '"stream": true), not /generate_stream nor POST / (docs/scale-out.md), and routes around a replica '
        "that is down; the KV budget, when not given, is split between them",
    )
    router_policy: str = flag(
        "cache_aware",
        "--replicas: SMG's routing policy (cache_aware, round_robin, random, power_of_two, least_load, "
        "prefix_hash, consistent_hashing)",
    )
    watchdog_timeout: float = flag(  # a step's time bound before the workers count as hung
        20.0,
        "seconds a forward step may take (plus 5 ms per token in it) before the workers count as hung: "
        "they are killed and restarted, and their requests recompute",
    )
    recovery_timeout: float = flag(
        60.0,
        "seconds in-flight requests wait for a faulty pipeline to become healthy again before they fail "
        "with 503",
    )
    chat_template: str | None = flag(
        None,
        "a Jinja chat template for the chat routes (vLLM's flag): a file, or the template itself; replaces "
        "the model's own (a model without one answers chat requests with 422 template_error)",
        derived=True,  # the template's text
    )
    api_key: str | None = flag(  # when set, routes other than health and metrics need "Bearer <key>"
        None,
        "require the header 'Authorization: Bearer <key>' on every route but /health, /ping, GET / and "
        "/metrics (401 otherwise)",
        derived=True,
    )
    body_timeout: float = flag(10.0, "seconds a request body may take to arrive (408 after)")
    sse_keep_alive: float = flag(
        15.0,
        "seconds a stream may stay silent before it gets a `:` keep-alive comment (TGI's 15 s), so proxies "
        "keep a queued request's connection open; 0: never (for clients that take every line for an event, "
        "as `vllm bench serve`)",
    )
    shutdown_timeout: float = flag(
        20.0, "on SIGTERM, seconds to wait for the requests in flight while /health and new requests get 503"
    )
    profile_dir: str | None = flag(  # where /start_profile + /stop_profile put traces; None: routes off
        None,
        "enable POST /start_profile and /stop_profile (404 without it): torch.profiler traces of the "
        "workers' steps go to this folder (worker-<rank>-<time>.trace.json, for Perfetto or "
        "chrome://tracing); see scripts/profile",
        derived=True,  # made absolute
    )
    enable_prefix_caching: bool = flag(
        True, "do not reuse the KV pages of shared prompt prefixes", name="--disable-prefix-caching"
    )
    kv_events_endpoint: str | None = flag(
        None,
        "publish the prefix cache's KV-cache events in vLLM's format on a ZeroMQ PUB socket, for routers "
        "that route by cached prefix (llm-d, Dynamo, vLLM's router): tcp://*:PORT binds, tcp://HOST:PORT "
        "connects to a collector (off by default)",
    )
    kv_events_replay_endpoint: str | None = flag(
        None, "bind a ROUTER here that replays the last 10,000 event batches from a sequence number"
    )
    kv_events_topic: str = flag("", "the topic frame of every KV event message (vLLM's default: none)")
    overlap_schedule: bool = flag(
        True, "build each step only after the previous one returned", name="--disable-overlap-schedule"
    )
    disable_grammar_support: bool = flag(
        False, "refuse `grammar` and `response_format` (structured output) with a 422, as TGI's flag"
    )
    grammar_compile_timeout: float = flag(
        10.0, "seconds a request's grammar may take to compile; one that takes longer is refused with a 422"
    )
    deterministic: str = flag(
        "auto",
        "batch-invariant steps on the CPU (a request's greedy and seeded tokens do not depend on the "
        "requests beside it, nor on a replay): on, off, or auto: on with float weights (as fast as off, "
        "measured), off with quantized ones (prefill slower); Llama-family models",
    )
    # Derived by the launcher from the model and the machine.
    cpus: tuple[int, ...] | None = None  # a replica's cores (--replicas): its processes run there
    batch_invariant: bool = False  # --deterministic, where it can hold (cli.batch_invariant)
    device: str = "cpu"
    block_size: int = 16
    # Every attention layer's sliding window (the largest; None: some layer sees the whole context): the
    # scheduler frees the pages behind it (``tgi_zmq.block_manager``), keeping one page as the null page.
    kv_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    vocab_size: int | None = None  # the model's logits (config.json, read by the launcher): token ids < it
    # Set for encoder-decoder models (T5): prompts go to the encoder.
    decoder_start_token_id: int | None = None
    # The CPU kernels the launcher loaded (tgi_zmq.native.describe: "native avx512", "torch fallback"),
    # for /info; each worker logs its own. None: not looked at (a config made without the launcher).
    kernels: str | None = None

    @property
    def num_blocks(self) -> int:
        return self.max_batch_total_tokens // self.block_size

    def endpoint(self, name: str) -> str:
        """The ipc:// address of the socket a process binds (frontend, tokenizer, ...); on a node other
        than 0, the TCP address of node 0's sockets its ranks reach (``node0_tcp``)."""
        if self.node_rank > 0 and name in NODE0_PORTS:
            return f"tcp://{self.master_addr}:{self.master_port + NODE0_PORTS[name]}"
        return f"ipc://{self.runtime_dir}/{name}.sock"

    def node0_tcp(self, name: str) -> str | None:
        """Where node 0 also binds socket ``name`` for the other nodes' ranks (None: one node)."""
        if self.nnodes == 1 or name not in NODE0_PORTS:
            return None
        return f"tcp://*:{self.master_port + NODE0_PORTS[name]}"

    @property
    def local_ranks(self) -> range:
        """The ranks this node runs (all of them with one node)."""
        per_node = self.num_shard // self.nnodes
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)

    @property
    def shm_prefix(self) -> str:
        """Prefix of this service's shared-memory buffers (unique per runtime dir)."""
        return "tgi-zmq-" + Path(self.runtime_dir).name

    @property
    def local_url(self) -> str:
        """Where this machine reaches the HTTP server."""
        host = "127.0.0.1" if self.hostname in ("0.0.0.0", "::") else self.hostname
        return f"http://{host}:{self.port}"

    @property
    def served_model_name(self) -> str:
        """The name responses and /info give the model (the first of ``served_model_names``)."""
        return self.served_model_names[0]

    def save(self) -> Path:
        path = Path(self.runtime_dir) / "config.json"
        path.write_text(self.to_json())
        return path

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def load(cls, runtime_dir: str | None = None) -> ServerConfig:
        runtime_dir = runtime_dir or os.environ[RUNTIME_DIR_ENV]
        return cls.from_json((Path(runtime_dir) / "config.json").read_text())

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        data = json.loads(text)
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        data["served_model_names"] = tuple(data["served_model_names"])
        data["cpus"] = tuple(data["cpus"]) if data["cpus"] is not None else None
        return cls(**data)
