"""Several engines behind vLLM's own router: ``zoo serve --replicas N`` and ``zoo route``.

Each replica is exactly the server ``zoo serve`` runs alone (vLLM's OpenAI
server with zoo's plugin and middleware, the same registry), on its own port,
with its share of the CPU cores (or its own GPU) and a KV cache sized so that
all of them fit. ``vllm-router`` (vllm-project/router) runs in front on the
public port: health checks, retries and circuit breakers are its own. zoo
starts and stops all of it, and restarts a replica that dies.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from zoo.catalog.home import staging_dir
from zoo.catalog.registry import Registry
from zoo.core.tables import DEFAULT_ROUTER_POLICY as DEFAULT_POLICY
from zoo.core.tables import ROUTER_POLICIES as POLICIES
from zoo.errors import NotSupported, ServeError
from zoo.serve.launch import (
    ServeOptions,
    ServePlan,
    default_cpu_loras,
    describe,
    die_with_us,
    free_port,
    plan_serve,
    prepare_base,
    sigterm_interrupts,
    stop,
    vllm_argv,
    wait_healthy,
)
from zoo.serve.plugin import STATE_VARIABLE

# How often the router probes each engine, and how fast it gives up on a dead one.
HEALTH_INTERVAL_S = 2
HEALTH_TIMEOUT_S = 2


@dataclass
class Replica:
    index: int
    port: int
    plan: ServePlan  # its argv and env are this replica's own
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def router_command() -> str:
    """The ``vllm-router`` executable: beside this Python, or on PATH."""
    beside = Path(sys.executable).with_name("vllm-router")
    found = str(beside) if beside.exists() else shutil.which("vllm-router")
    if not found:
        raise ServeError("vllm-router is not installed",
                         hint="pip install vllm-router (zoo's bootstrap installs it).")
    return found


def router_argv(workers: list[str], host: str, port: int, policy: str) -> list[str]:
    if policy not in POLICIES:
        raise ServeError(f"unknown router policy {policy!r}", hint=f"Use {', '.join(POLICIES)}.")
    if not workers:
        raise ServeError("no worker URLs", hint="Pass --worker URL (repeatable).")
    check_workers(workers)
    workers = [w.rstrip("/").removesuffix("/v1") for w in workers]  # the router adds /v1
    argv = [router_command(), "--host", host, "--port", str(port), "--policy", policy,
            "--worker-urls", *workers,
            "--health-check-interval-secs", str(HEALTH_INTERVAL_S),
            "--health-check-timeout-secs", str(HEALTH_TIMEOUT_S),
            "--health-failure-threshold", "1", "--health-success-threshold", "1",
            "--worker-startup-timeout-secs", "900", "--log-level", "warning",
            # its Prometheus exporter binds a fixed port (29000) by default: a second router
            # on the host would fail to start
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    return argv


def cpu_shares(replicas: int) -> list[str]:
    """Each replica's cores for vLLM's OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND``)."""
    cores = sorted(os.sched_getaffinity(0))
    if replicas > len(cores):
        raise ServeError(f"{replicas} replicas on {len(cores)} cores",
                         hint="Give each replica at least one core (--replicas).")
    per = len(cores) // replicas
    return [",".join(str(c) for c in cores[i * per:(i + 1) * per]) for i in range(replicas)]


def plan_replicas(options: ServeOptions, replicas: int, registry: Registry,
                  state: Path, gpus: int = 0) -> list[Replica]:
    """One plan per replica: its port, cores (or GPU), KV cache and share of LoRA slots.
    The catalog is read and checked once (``plan_serve``); replicas differ in argv and env."""
    if replicas < 1:
        raise ServeError("--replicas must be at least 1")
    shared = plan_serve(options, registry)
    max_loras = options.max_loras or max(1, shared.max_loras // replicas)
    max_cpu_loras = options.max_cpu_loras or default_cpu_loras(max_loras)
    shares = cpu_shares(replicas) if not gpus else [""] * replicas
    planned = []
    for i in range(replicas):
        port = free_port()
        own = replace(options, port=port, host="127.0.0.1")
        argv = vllm_argv(own, shared.base, shared.model_path, shared.max_lora_rank, max_loras,
                         max_cpu_loras, engines=replicas, gpu=bool(gpus),
                         wrapped=shared.wrapped)
        replica_state = state / f"replica-{i}"
        replica_state.mkdir()
        run_env = {**shared.env, STATE_VARIABLE: str(replica_state)}
        if gpus:
            run_env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        else:
            run_env["VLLM_CPU_OMP_THREADS_BIND"] = shares[i]
        plan = replace(shared, argv=argv, env=run_env, max_loras=max_loras,
                       max_cpu_loras=max_cpu_loras)
        planned.append(Replica(i, port, plan, replica_state / "vllm.log"))
    return planned


def start_replica(replica: Replica) -> None:
    with open(replica.log_path, "ab") as out:
        replica.process = subprocess.Popen(replica.plan.argv, env=replica.plan.env, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           preexec_fn=die_with_us)


@dataclass
class Fleet:
    """Running replicas and the router in front of them."""

    url: str  # the router's, ending in /v1
    replicas: list[Replica]
    router: subprocess.Popen
    router_log: Path


def _supervise(fleet: Fleet, stopping: threading.Event, log: Callable[[str], None],
               interval: float = 1.0) -> None:
    """Restart any replica that exits; the router's health checks take it back."""
    while not stopping.wait(interval):
        for replica in fleet.replicas:
            process = replica.process
            if process is None or process.poll() is None or stopping.is_set():
                continue
            _kill_group(process)  # its engine processes, if any are left
            replica.restarts += 1
            log(f"replica {replica.index} ({replica.url}) exited with code "
                f"{process.returncode}: restarting it (restart {replica.restarts})")
            start_replica(replica)


def _kill_group(process: subprocess.Popen, timeout: float = 10) -> None:
    """End what is left of a dead replica's process group (its engine core and workers
    die with their parent anyway: plugin.die_with_parent) and wait until it is gone, so
    the restart never runs beside the old engine's memory."""
    deadline = time.monotonic() + timeout
    try:
        os.killpg(process.pid, signal.SIGKILL)
        while time.monotonic() < deadline:
            time.sleep(0.1)
            os.killpg(process.pid, 0)  # ProcessLookupError once the last one is reaped
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def running_fleet(options: ServeOptions, replicas: int, policy: str = DEFAULT_POLICY,
                  registry: Registry | None = None, gpus: int = 0,
                  startup_timeout: float = 900, log: Callable[[str], None] = lambda _: None
                  ) -> Iterator[Fleet]:
    """Start ``replicas`` engines and the router on ``options.port``; stop all on exit."""
    registry = registry or Registry()
    prepare_base(options, registry, log)
    with staging_dir(registry.home, "serve") as state:
        planned = plan_replicas(options, replicas, registry, state, gpus)
        for line in describe(planned[0].plan, options)[:1]:
            log(line)
        try:
            for replica in planned:
                start_replica(replica)
                log(f"replica {replica.index}: {replica.url} (cores "
                    f"{replica.plan.env.get('VLLM_CPU_OMP_THREADS_BIND', '-')}, log "
                    f"{replica.log_path})")
            for replica in planned:
                wait_healthy(replica.url, replica.process, replica.log_path, startup_timeout)
            router_log = state / "router.log"
            with open(router_log, "ab") as out:
                router = subprocess.Popen(
                    router_argv([r.url for r in planned], options.host, options.port, policy),
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=die_with_us)
            url = f"http://{options.host}:{options.port}"
            try:
                wait_healthy(url, router, router_log, 60, "vllm-router")
                fleet = Fleet(url + "/v1", planned, router, router_log)
                log(f"vllm-router ({policy}) on {url}/v1 in front of {len(planned)} replicas")
                stopping = threading.Event()
                watcher = threading.Thread(target=_supervise, args=(fleet, stopping, log),
                                           daemon=True)
                watcher.start()
                try:
                    yield fleet
                finally:
                    stopping.set()
                    watcher.join()
            finally:
                stop(router, timeout=10)
        finally:
            for replica in planned:
                if replica.process is not None:
                    stop(replica.process)


def serve_replicas(options: ServeOptions, replicas: int, policy: str,
                   registry: Registry | None = None, gpus: int = 0,
                   log: Callable[[str], None] = lambda _: None) -> int:
    """Run the fleet in the foreground until Ctrl-C or SIGTERM."""
    with sigterm_interrupts():
        try:
            with running_fleet(options, replicas, policy, registry, gpus, log=log) as fleet:
                while fleet.router.poll() is None:
                    time.sleep(1.0)
                log(f"vllm-router exited with code {fleet.router.returncode}; "
                    f"see {fleet.router_log}")
                return fleet.router.returncode or 1
        except KeyboardInterrupt:
            return 0


def check_workers(workers: list[str]) -> None:
    """Each worker is a server's URL (the router's own refusal is a traceback from its
    process)."""
    for worker in workers:
        parts = urllib.parse.urlsplit(worker)
        try:
            ok = parts.scheme in ("http", "https") and bool(parts.hostname) and \
                parts.port != 0
        except ValueError:  # a port that is no number, or past 65535
            ok = False
        if not ok:
            raise NotSupported(f"--worker {worker!r} is not the URL of a server",
                               hint="Write http://HOST:PORT of a running 'zoo serve', e.g. "
                                    "http://10.0.0.2:8000.")


def route(workers: list[str], host: str, port: int, policy: str,
          log: Callable[[str], None] = lambda _: None) -> int:
    """``zoo route``: the router alone, in the foreground, in front of running servers."""
    argv = router_argv(workers, host, port, policy)
    log(f"vllm-router ({policy}) on http://{host}:{port}/v1 in front of {', '.join(workers)}")
    process = subprocess.Popen(argv, preexec_fn=die_with_us)
    with sigterm_interrupts():  # a SIGTERM must not leave the router running
        try:
            return process.wait()
        except KeyboardInterrupt:
            return stop(process, timeout=10)
