"""The engine's API server and engine core moved off the worker's CPUs (serve/cores.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from zoo.serve import cores

CPUS = sorted(os.sched_getaffinity(0))


def test_cpu_lists_and_what_is_left_to_the_others():
    assert cores.parse_cpu_list("0-2,5\n") == {0, 1, 2, 5}
    assert cores.parse_cpu_list("3") == {3}
    assert cores.reserved_cpus({0}, {0, 1}) == {1}
    assert cores.reserved_cpus({0, 2}, {0, 1, 2, 3}) == {1, 3}
    assert cores.reserved_cpus({0, 1}, {0, 1}) == set()  # the worker has them all
    assert cores.reserved_cpus(set(), {0, 1}) == set()
    assert cores.reserved_cpus({4}, {0, 1}) == set()  # not a binding from these
    assert cores.allowed_cpus(os.getpid()) == set(CPUS)
    assert cores.parent_of(os.getpid()) == os.getppid()


@pytest.mark.skipif(len(CPUS) < 2, reason="moving threads between CPUs needs two")
def test_every_thread_of_a_process_moves_and_its_new_threads_follow():
    """A process with several threads: each is moved, and a thread it starts afterwards
    inherits the new CPUs (vLLM's processes start threads as they serve)."""
    script = ("import threading, time, sys\n"
              "ts = [threading.Thread(target=time.sleep, args=(60,), daemon=True) "
              "for _ in range(3)]\n"
              "[t.start() for t in ts]\n"
              "print('ready', flush=True)\n"
              "sys.stdin.readline()\n"
              "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
              "print('more', flush=True)\n"
              "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        target = {CPUS[-1]}
        cores.move_threads(child.pid, target)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "more"
        time.sleep(0.2)
        tasks = os.listdir(f"/proc/{child.pid}/task")
        assert len(tasks) == 5
        assert all(os.sched_getaffinity(int(t)) == target for t in tasks)
    finally:
        child.kill()
        child.wait()
