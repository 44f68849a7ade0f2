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
PROCESSES = ("frontend", "tokenizer", "scheduler", "detokenizer")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_id: str  # local folder with config.json, tokenizer files and *.safetensors
    served_model_name: str
    runtime_dir: str
    hostname: str = "0.0.0.0"
    port: int = 8080
    dtype: str = "float32"  # resolved: float32 | bfloat16 | float16
    device: str = "cpu"
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int = 65536
    max_concurrent_requests: int = 128
    max_stop_sequences: int = 4
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000
    num_shard: int = 1
    master_addr: str = "localhost"
    master_port: int = 29500
    block_size: int = 16
    enable_prefix_caching: bool = True
    overlap_schedule: bool = True
    eos_token_ids: tuple[int, ...] = ()
    decoder_start_token_id: int | None = (
        None  # set for encoder-decoder models (T5): prompts go to the encoder
    )
    torch_threads: int = 0  # 0 = all cores
    watchdog_timeout: float = 20.0  # a step's time bound before the workers count as hung (+5 ms/token)
    recovery_timeout: float = 60.0  # how long requests wait for a faulty pipeline to heal
    api_key: str | None = None  # when set, routes other than health and metrics need "Bearer <key>"
    body_timeout: float = 10.0  # seconds to receive a request body (408 after)
    shutdown_timeout: float = 20.0  # seconds a SIGTERM'd frontend waits for requests in flight

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
