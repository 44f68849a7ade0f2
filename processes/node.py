"""The agent of a node other than 0 (``--nnodes``): node 0's scheduler restarts this node's ranks
through it, as it kills its own ranks by pid (a pid of this host means nothing on node 0).

It connects to node 0's scheduler as ``node-<K>`` and, on each ``RestartRanksRequest``, kills the
worker ranks its supervisord runs (its siblings), which supervisord starts again.
"""

from __future__ import annotations

import os

import zmq

from tgi_zmq import messages as m
from tgi_zmq.config import ServerConfig
from tgi_zmq.pids import ProcessHandle, children
from tgi_zmq.runtime import die_with_supervisord, exit_on_sigterm, setup_logging

log = setup_logging("node")


def ranks_to_restart(spare: int) -> list[ProcessHandle]:
    """The worker ranks this agent's supervisord runs, but rank ``spare``."""
    supervisord = os.getppid()
    spared = children(supervisord, b"--rank\0%d\0" % spare)  # a command line has NUL between its words
    return [ProcessHandle.learn(p) for p in children(supervisord, b"processes/worker.py") if p not in spared]


def main() -> None:
    exit_on_sigterm()
    die_with_supervisord()
    config = ServerConfig.load()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"node-{config.node_rank}".encode())
    sock.connect(config.endpoint("worker"))
    log.info(
        "node %d: ranks %s; node 0's scheduler at %s",
        config.node_rank,
        list(config.local_ranks),
        config.endpoint("worker"),
    )
    while True:
        try:
            restart = m.decode(sock.recv(), (m.RestartRanksRequest,))  # the only thing node 0 says here
        except m.ProtocolError as exc:
            log.error("dropped a bad frame: %s", exc)
            continue
        killed = [rank.pid for rank in ranks_to_restart(restart.spare) if rank.kill()]
        log.warning("node 0 restarts the ranks' group: killed this node's ranks, pids %s", killed)


if __name__ == "__main__":
    main()
