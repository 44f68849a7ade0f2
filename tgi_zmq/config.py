"""The one configuration object every process reads, and where the sockets live.

``tgi-zmq launch`` resolves the launcher flags into a ``ServerConfig``, writes it as
JSON into a private runtime directory and points every process at it with the
``TGI_ZMQ_RUNTIME_DIR`` environment variable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

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

# Launcher defaults that depend on the device it finds ("cpu" or "cuda").
# Prompt tokens per forward step (fewer beside running decodes: scheduler.StepCosts sizes those chunks).
DEFAULT_PREFILL_TOKENS = {"cpu": 4096, "cuda": 4096}
# Share of the free memory the KV cache takes: of available RAM (mapped lazily), of free GPU memory.
DEFAULT_MEMORY_FRACTION = {"cpu": 0.3, "cuda": 0.9}


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything the processes share. The field defaults are also the launcher's flag defaults
    (``cli.LAUNCH_FLAGS``); fields the launcher derives from the model and the machine say so."""

    model_id: str  # local folder with config.json, tokenizer files and *.safetensors
    served_model_name: str
    runtime_dir: str
    hostname: str = "0.0.0.0"
    port: int = 8080
    dtype: str = "float32"  # resolved from --dtype: one of dtypes.SERVED
    device: str = "cpu"
    quantize: str | None = None  # a --quantize value, "gguf" for a GGUF file, None: dense weights
    kv_cache_dtype: str | None = None  # fp8_e5m2 | fp8_e4m3fn; None: the model's dtype
    # The launcher derives these four from the model, the device and the memory.
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int = 65536
    max_concurrent_requests: int = 128
    max_stop_sequences: int = 4
    max_client_batch_size: int = 4
    max_best_of: int = 2
    max_top_n_tokens: int = 5
    enable_prefill_logprobs: bool = False  # allow ``decoder_input_details`` / ``echo`` with logprobs
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
    payload_limit: int = 2_000_000
    num_shard: int = 1
    master_addr: str = "localhost"
    master_port: int = 29500
    block_size: int = 16
    enable_prefix_caching: bool = True
    overlap_schedule: bool = True
    disable_grammar_support: bool = False
    grammar_compile_timeout: float = 10.0  # seconds a grammar may take to compile (422 after)
    eos_token_ids: tuple[int, ...] = ()
    vocab_size: int | None = None  # the model's logits (config.json, read by the launcher): token ids < it
    # Set for encoder-decoder models (T5): prompts go to the encoder.
    decoder_start_token_id: int | None = None
    torch_threads: int = 0  # per worker; 0: by the rule of tgi_zmq.cpus
    watchdog_timeout: float = 20.0  # a step's time bound before the workers count as hung (+5 ms/token)
    recovery_timeout: float = 60.0  # how long requests wait for a faulty pipeline to heal
    api_key: str | None = None  # when set, routes other than health and metrics need "Bearer <key>"
    body_timeout: float = 10.0  # seconds to receive a request body (408 after)
    shutdown_timeout: float = 20.0  # seconds a SIGTERM'd frontend waits for requests in flight
    profile_dir: str | None = None  # where /start_profile + /stop_profile put traces; None: routes off

    @property
    def num_blocks(self) -> int:
        return self.max_batch_total_tokens // self.block_size

    def endpoint(self, name: str) -> str:
        """The ipc:// address of the socket a process binds (frontend, tokenizer, ...)."""
        return f"ipc://{self.runtime_dir}/{name}.sock"

    @property
    def shm_prefix(self) -> str:
        """Prefix of this service's shared-memory buffers (unique per runtime dir)."""
        return "tgi-zmq-" + Path(self.runtime_dir).name

    def save(self) -> Path:
        path = Path(self.runtime_dir) / "config.json"
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, runtime_dir: str | None = None) -> ServerConfig:
        runtime_dir = runtime_dir or os.environ[RUNTIME_DIR_ENV]
        data = json.loads((Path(runtime_dir) / "config.json").read_text())
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        return cls(**data)
