"""One replica of ``tgi-zmq launch --replicas N`` (``supervisord-replicas.conf`` starts ``replica-<i>``):
it becomes that replica's own supervisord, pinned to the replica's cores, which its processes inherit.

Its configuration was saved by the launcher in its runtime dir, inside the set's ``$TGI_ZMQ_RUNTIME_DIR``
(``tgi_zmq.replicas.replica_dir``).
A replica killed outright takes its processes with it (``runtime.die_with_supervisord``); the next one
first deletes the shared memory the last one could not.
"""

from __future__ import annotations

import os
import sys

from tgi_zmq.cli import supervisord_invocation
from tgi_zmq.config import RUNTIME_DIR_ENV, ServerConfig
from tgi_zmq.replicas import replica_dir
from tgi_zmq.runtime import die_with_supervisord
from tgi_zmq.transport import remove_stale


def main() -> None:
    index = int(sys.argv[1])
    config = ServerConfig.load(str(replica_dir(os.environ[RUNTIME_DIR_ENV], index)))
    die_with_supervisord()  # the replica set's supervisord
    os.sched_setaffinity(0, config.cpus)
    remove_stale(config.shm_prefix)
    argv, env = supervisord_invocation(config)
    env["TGI_ZMQ_REPLICA"] = str(index)  # in every log line's process name
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()
