"""The worker's cores to itself: the engine's other processes moved to the CPUs vLLM
reserved for them.

On the CPU platform vLLM binds its worker's threads to every allowed CPU but one per
worker (``VLLM_CPU_OMP_THREADS_BIND=auto``; on a 2-CPU machine the worker gets CPU 0)
and keeps the rest "for other processes", but never puts the other processes there:
the API server and the engine core may run on any CPU, the worker's included, where
each slice they take is time the worker, bound to its CPU, cannot run elsewhere. On 2
CPUs, a burst of 64 requests measured the worker's steps 5-8% faster, and an adapter's
first use 12% faster, with both moved off its CPU (1-token bursts, the same engine
pinned by hand and not; bench notes in docs/BENCHMARKS.md).

Once the worker is bound (by OpenMP's places, which vLLM sets as it starts the worker;
zoo acts after ``CPUWorker.init_device``), zoo moves every thread of
its engine core (the worker's parent) and of the API server (the engine core's parent)
to the allowed CPUs the worker does not use; threads they start later inherit that.
Only where vLLM chose the binding itself (``auto``) and the engine has one worker: a
binding someone set (zoo's replicas set one each) says where everything goes already.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger("zoo.serve")


def install() -> None:
    """Wrap ``CPUWorker.init_device``: once bound, move the engine's other processes."""
    from vllm.v1.worker.cpu_worker import CPUWorker

    original = CPUWorker.init_device
    if getattr(original, "_zoo_moves", False):
        return

    @functools.wraps(original)
    def init_device(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        try:
            _move_engine_off(self)
        except Exception as error:  # noqa: BLE001 - an optimisation: never fail the worker
            logger.warning("zoo: the engine's other processes stay where they are: %s: %s",
                           type(error).__name__, error)
        return result

    init_device._zoo_moves = True
    CPUWorker.init_device = init_device


def _move_engine_off(worker) -> None:
    import vllm.envs as envs

    if envs.VLLM_CPU_OMP_THREADS_BIND != "auto" or worker.parallel_config.world_size != 1:
        return
    engine_core = os.getppid()
    others = reserved_cpus(os.sched_getaffinity(0), allowed_cpus(engine_core))
    if not others:
        return
    pids = [engine_core, parent_of(engine_core)]
    for pid in pids:
        move_threads(pid, others)
    logger.info("zoo: the engine core and API server (pids %s) moved to CPUs %s, off the "
                "worker's %s", ", ".join(map(str, pids)), sorted(others),
                sorted(os.sched_getaffinity(0)))


def reserved_cpus(workers: set[int], allowed: set[int]) -> set[int]:
    """The CPUs left to the other processes: ``allowed`` (what vLLM bound the worker
    from) less the worker's; none when the worker has them all or none."""
    return set(allowed) - set(workers) if workers and set(workers) < set(allowed) else set()


def allowed_cpus(pid: int) -> set[int]:
    """The CPUs process ``pid`` may run on (its ``Cpus_allowed_list``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpu_list(line.split(":", 1)[1])
    raise ValueError(f"no Cpus_allowed_list for process {pid}")


def parse_cpu_list(text: str) -> set[int]:
    """``"0-2,5"`` -> {0, 1, 2, 5}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state


def move_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (a thread that ended meanwhile is skipped)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:
            continue
