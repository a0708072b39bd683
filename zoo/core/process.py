"""Which process left a record in a zoo home, and whether that process still runs.

A pid names a process only while it lives. A container restarted on the same home volume
starts its processes in the same order, so a crashed server's pid is soon the new
server's, or anyone's: judged by pid alone, the dead server's leases, engine limits and
in-flight reservations would stay in force for as long as that stranger runs. zoo names
a process by its pid and its start time (the kernel's clock ticks since boot, field 22 of
``/proc/PID/stat``), packed in one integer so that it fits the file names and the meter's
INTEGER columns it always used. Where there is no ``/proc`` (macOS), or for a record an
earlier zoo wrote (a bare pid), the pid alone decides, as it did before.
"""

from __future__ import annotations

import os

PID_BITS = 22  # Linux's pid_max is at most 2**22
_PID_MASK = (1 << PID_BITS) - 1


def started(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None without ``/proc`` or process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the name (field 2) is in parentheses and may hold spaces or ')': split after the last
    return int(stat[stat.rindex(b")") + 2:].split()[19])


_OWN: dict[int, int] = {}  # this process's identity, by pid (a fork is another process)


def identity(pid: int | None = None) -> int:
    """This process (or ``pid``) as one integer: its start time above its pid."""
    if pid is None:
        pid = os.getpid()
        if pid not in _OWN:
            _OWN[pid] = identity(pid)
        return _OWN[pid]
    return ((started(pid) or 0) << PID_BITS) | pid


def pid_of(ident: int) -> int:
    return ident & _PID_MASK


def alive(ident: int) -> bool:
    """Whether the process ``ident`` names still runs (not another one with its pid). A
    process that cannot be signalled (another user's) counts as running."""
    pid, start = pid_of(ident), ident >> PID_BITS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OverflowError, ValueError):  # not a pid at all
        return False
    if not start:  # a bare pid: all there is to go on
        return True
    now = started(pid)
    if now is None:  # no /proc to ask, or the process ended just now
        return not os.path.exists("/proc/self/stat")
    return now == start
