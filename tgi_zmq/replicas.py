"""``tgi-zmq launch --replicas N``: N complete services on one machine behind SMG, the Shepherd Model
Gateway (``pip install smg``; we route with it, we do not write a router).

One supervisord (``supervisord-replicas.conf``) runs ``replica-<i>`` (``processes/replica.py``: that
replica's own supervisord and pipeline, on its share of the cores, on 127.0.0.1 at ``--port + 1 + i``)
and ``router`` (``smg launch`` on ``--port`` with ``--router-policy``). A replica that dies is restarted
by it; SMG's health checks (every second) take it out of rotation meanwhile and back after. Each
replica is a whole service: its KV budget (a share of the memory, when not given), its own KV-event
port (vLLM's rule: the port plus the replica's index), its own ``--master-port`` (plus the index).

SMG registers a worker under the first name its ``/v1/models`` lists: the others become its aliases
(``--model-alias``), so TGI's ``model="tgi"`` and the model's own name both route.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import socket
import sys
import urllib.request
from pathlib import Path

from tgi_zmq import cpus
from tgi_zmq.config import ServerConfig

SMG = Path(sys.executable).with_name("smg")  # the wheel's entry point, in this environment
ROUTER_POLICIES = (
    "cache_aware",
    "round_robin",
    "random",
    "power_of_two",
    "least_load",
    "prefix_hash",
    "consistent_hashing",
)
HEALTH_CHECK_SECONDS = 1  # SMG's probe of each replica (its default, 60 s, keeps a dead one in rotation)
LOAD_POLL_SECONDS = 2  # SMG's reads of each replica's /v1/loads (its default: 10 s)
# Requests over the pool's mean before cache_aware spills to the least loaded replica. SMG's default
# (64) suits GPU engines; with it 16 requests at 8 at once went 14 to one replica and 2 to the other
# here, with 4 they went 8 and 8 (and 32 at once 16 and 16).
SPILL_REQUESTS = 4


def check(config: ServerConfig) -> None:
    """Refuse a replica set that could not run, before anything starts."""
    if config.replicas < 1:
        raise ValueError(f"--replicas {config.replicas}: at least 1")
    if config.replicas == 1:
        return
    if config.router_policy not in ROUTER_POLICIES:
        raise ValueError(f"--router-policy {config.router_policy}: choose {', '.join(ROUTER_POLICIES)}")
    cpus.split(cpus.service_cores(), config.replicas)  # at most one replica a core
    if not SMG.exists():
        raise ValueError(f"--replicas needs SMG's router at {SMG} (pip install smg; ./scripts/setup does)")
    for port in [
        config.port,
        *(replica_port(config, i) for i in range(config.replicas)),
        metrics_port(config),
    ]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                raise ValueError(
                    f"--replicas {config.replicas} uses port {port}, which is taken: {exc}"
                ) from None


def replica_port(config: ServerConfig, index: int) -> int:
    return config.port + 1 + index


def metrics_port(config: ServerConfig) -> int:
    """SMG's own Prometheus port (its default, 29000, would clash between two replica sets)."""
    return config.port + config.replicas + 1


def replica_configs(config: ServerConfig) -> list[ServerConfig]:
    """Each replica's whole configuration, in a folder of the replica set's runtime dir."""
    shares = cpus.split(cpus.service_cores(), config.replicas)
    return [
        dataclasses.replace(
            config,
            replicas=1,
            runtime_dir=str(replica_dir(config.runtime_dir, i)),
            hostname="127.0.0.1",
            port=replica_port(config, i),
            master_port=config.master_port + i,
            cpus=tuple(share),
            kv_events_endpoint=offset_endpoint(config.kv_events_endpoint, i),
            kv_events_replay_endpoint=offset_endpoint(config.kv_events_replay_endpoint, i),
        )
        for i, share in enumerate(shares)
    ]


def replica_dir(runtime_dir: str, index: int) -> Path:
    """A replica's runtime dir, in the replica set's: its name, which names the replica's shared
    memory, is unique on the machine as the set's is."""
    return Path(runtime_dir) / f"{Path(runtime_dir).name}-{index}"


def offset_endpoint(endpoint: str | None, index: int) -> str | None:
    """vLLM's rule for its data-parallel ranks: a tcp port plus the index; an ipc path gets a suffix."""
    if not endpoint or index == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        address, _, port = endpoint.rpartition(":")
        return f"{address}:{int(port) + index}"
    return f"{endpoint}-{index}"


def router_command(config: ServerConfig) -> list[str]:
    urls = [f"http://127.0.0.1:{replica_port(config, i)}" for i in range(config.replicas)]
    first, *others = config.served_model_names
    return [
        str(SMG),
        "launch",
        *("--host", config.hostname, "--port", str(config.port), "--worker-urls", *urls),
        *("--policy", config.router_policy, "--balance-abs-threshold", str(SPILL_REQUESTS)),
        *(arg for name in others for arg in ("--model-alias", f"{name}={first}")),
        *("--prometheus-host", config.hostname, "--prometheus-port", str(metrics_port(config))),
        *("--worker-startup-check-interval", "1", "--health-check-interval-secs", str(HEALTH_CHECK_SECONDS)),
        *("--load-monitor-interval", str(LOAD_POLL_SECONDS)),
        *("--health-failure-threshold", "1", "--health-success-threshold", "1", "--log-level", "warn"),
        "--log-json",  # one line per event without the terminal colours SMG's text lines always carry
    ]


def prepare(config: ServerConfig) -> dict[str, str]:
    """Save every replica's configuration; the environment supervisord-replicas.conf reads."""
    for replica in replica_configs(config):
        Path(replica.runtime_dir).mkdir(mode=0o700)
        replica.save()
    return {
        "TGI_ZMQ_REPLICAS": str(config.replicas),
        "TGI_ZMQ_ROUTER_COMMAND": shlex.join(router_command(config)),
    }


def ready(config: ServerConfig) -> bool:
    """SMG sees every replica healthy."""
    try:
        with urllib.request.urlopen(config.local_url + "/workers", timeout=2) as response:
            workers = json.load(response)["workers"]
    except (OSError, ValueError, KeyError):
        return False
    return sum(bool(w.get("is_healthy")) for w in workers) == config.replicas
