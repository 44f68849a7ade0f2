"""``--nnodes``: one tensor-parallel group over several hosts, one ``tgi-zmq launch`` each.

Node 0 is a whole service: HTTP, the pipeline and its ranks (``ServerConfig.local_ranks``); its
scheduler and frontend also bind TCP sockets (``config.NODE0_PORTS``) for the other nodes. Another
node's launch first asks node 0's scheduler for its configuration (``join``: every rank must hold the
same limits and KV pages, which node 0 sized), then runs ``supervisord-node.conf``: its ranks, which
take each step over TCP with its tensors in the message, and its agent (``processes/node.py``), through
which node 0 restarts them. torch.distributed (gloo on CPU, NCCL on GPU) joins every rank at
``--master-addr:--master-port``.
"""

from __future__ import annotations

import dataclasses
import uuid

import zmq

from tgi_zmq import messages as m
from tgi_zmq.config import NODE0_PORTS, ServerConfig

JOIN_TIMEOUT_S = 60.0  # node 0 may still be starting


def check_place(node_rank: int, nnodes: int) -> None:
    if nnodes < 1:
        raise ValueError(f"--nnodes {nnodes}: at least 1")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} is out of range for --nnodes {nnodes}: 0 to {nnodes - 1}")


def check(config: ServerConfig) -> None:
    """Refuse a node layout that could not run, before anything starts."""
    check_place(config.node_rank, config.nnodes)
    if config.num_shard % config.nnodes:
        raise ValueError(
            f"--num-shard {config.num_shard} does not split evenly over --nnodes {config.nnodes}: "
            "give every node as many ranks"
        )
    if config.nnodes > 1 and config.replicas > 1:
        raise ValueError("--replicas and --nnodes do not combine: a replica set runs on one host")


def join(node_rank: int, master_addr: str, master_port: int, timeout: float = JOIN_TIMEOUT_S) -> ServerConfig:
    """Node 0's configuration, asked of its scheduler (the request waits in the socket until node 0
    is up, for at most ``timeout``)."""
    address = f"tcp://{master_addr}:{master_port + NODE0_PORTS['worker']}"
    identity = f"join-{node_rank}-{uuid.uuid4().hex[:8]}"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(m.encode(m.NodeJoinRequest(node_rank, identity)))
        if sock.poll(timeout * 1000):
            answer = m.decode(sock.recv(), (m.NodeJoinResult, m.NodeJoinRequest))
            if isinstance(answer, m.NodeJoinRequest):  # TCP's simultaneous open: it connected to itself
                raise ValueError(
                    f"{address} is in this host's ephemeral port range, where a client can connect to "
                    "itself while node 0 is not up: choose a --master-port below it (the default 29500 is)"
                )
            return ServerConfig.from_json(answer.config)
    except (zmq.ZMQError, m.ProtocolError) as exc:
        raise ValueError(f"node 0 at {address}: {exc}") from None
    finally:
        sock.close()
    raise ValueError(
        f"node 0 did not answer at {address} within {timeout:.0f} s: is it launched, with --nnodes and "
        "--master-port as here, and is --master-addr its address?"
    )


def node_config(node0: ServerConfig, node_rank: int, nnodes: int, master_addr: str) -> ServerConfig:
    """This node's configuration: node 0's, with this launch's place and node 0's address as seen
    from here."""
    if nnodes != node0.nnodes:
        raise ValueError(f"node 0 runs --nnodes {node0.nnodes}; this launch says --nnodes {nnodes}")
    return dataclasses.replace(node0, node_rank=node_rank, master_addr=master_addr, kernels=None)
