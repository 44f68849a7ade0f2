"""Kill only the process you mean: the kernel reuses pids, so a pid learnt from a heartbeat or a
worker's message may name another process by the time it is killed (the process died and supervisord
did not replace it, or gave up). A ``ProcessHandle`` records the process's start time when its pid is
learnt and kills nothing unless the pid still names a process that started then."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path


def _stat_field(pid: int, field: int) -> int | None:
    """Field ``field`` (numbered from 1, past the command's) of ``/proc/<pid>/stat``; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count from after it (field 3)
    return int(fields.rpartition(")")[2].split()[field - 3])


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22); None if gone."""
    return _stat_field(pid, 22)


def children(parent: int, command_part: bytes) -> list[int]:
    """The processes ``parent`` started whose command line contains ``command_part``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _stat_field(int(proc.name), 4) == parent:  # field 4: the parent
            try:
                if command_part in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue  # it exited meanwhile
    return pids


@dataclasses.dataclass(frozen=True)
class ProcessHandle:
    pid: int
    started: int | None  # ``start_time(pid)`` when learnt; None: already gone then

    @classmethod
    def learn(cls, pid: int) -> ProcessHandle:
        return cls(pid, start_time(pid))

    def kill(self) -> bool:
        """SIGKILL the process if ``pid`` still names it; True if it was signalled.

        A pidfd opened before the check pins the process it names: if the start time still matches
        after the open, that process is the one learnt, and the signal can reach no other.
        """
        if self.started is None:
            return False
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        try:
            if start_time(self.pid) != self.started:
                return False
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            return True
        except ProcessLookupError:  # it exited (and was reaped) since the check
            return False
        finally:
            os.close(pidfd)
