"""Each engine step's time and its parts, written by vLLM's worker for benchmarks.

A served burst's seconds on this kind of machine drift by tens of percent from one
minute to the next, and a change of a percent in the adapters' cost hides in them. A
step's own parts move together with the machine's speed: the LoRA work of a decode step
next to the base's linear layers of the same step says what the adapters cost, whatever
the minute. With ``ZOO_STEP_TIMES=PREFIX`` in ``zoo serve``'s environment, zoo's plugin
has each vLLM process that runs steps (the worker) append one line a step to
``PREFIX.PID``::

    START SECONDS TOKENS REQUESTS LINEAR LORA NATIVE

START is the step's start (``time.monotonic``, the same clock in every process),
SECONDS its length (``execute_model`` and, where vLLM samples in a call of its own,
``sample_tokens``), TOKENS and REQUESTS what the scheduler gave it, LINEAR the seconds
in the base's linear layers (their quantization method's ``apply``), LORA the seconds in
zoo's LoRA work: its wrapper (``add_lora_linear`` or, for a layer routed to the kernel,
``add_lora_prepared``, ``add_lora_logits``, ``add_lora_embedding``) and the step's
routing of the layers (``layer_routes.route``, which makes new slots' int8 rows),
NATIVE the part of LORA in the native kernel's call (``native.Kernel.gather``, its
checks included): the rest of LORA is the wrapper's Python.
The timers add about a microsecond a call. Without the variable nothing is installed.

A cold burst waits for its adapters' loads before its first step, and those run in two
processes at once (``first_use.py``). Each process also appends a line a load to
``PREFIX-loads.PID``::

    KIND START SECONDS

KIND ``begin`` in the engine core: a load begun (``first_use._begin_load``), within it
``wait`` for the worker to answer an earlier one (``first_use._make_room``: at most
``IN_FLIGHT`` unanswered) and ``read`` where the core read the adapter itself
(``core_reading.read``); ``add_lora`` in the worker: the adapter read or handed over,
and placed.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

VARIABLE = "ZOO_STEP_TIMES"


@dataclass(frozen=True)
class Step:
    """One line of a step-times file."""

    start: float
    seconds: float
    tokens: int
    requests: int
    linear: float
    lora: float
    native: float

    @property
    def rest(self) -> float:
        """The step's seconds outside the linear layers and the LoRA wrapper."""
        return self.seconds - self.linear - self.lora


@dataclass(frozen=True)
class Load:
    """One line of a loads file."""

    kind: str  # "begin", "wait", "read" (the engine core) or "add_lora" (the worker)
    start: float
    seconds: float

    @property
    def end(self) -> float:
        return self.start + self.seconds


def read_loads(path) -> list[Load]:
    """The loads of a loads file, in the order they ended."""
    with open(path) as lines:
        return [Load(kind, float(start), float(seconds))
                for kind, start, seconds in (line.split() for line in lines)]


def read(path) -> list[Step]:
    """The steps of a step-times file, in the order they ran."""
    steps = []
    with open(path) as lines:
        for line in lines:
            start, seconds, tokens, requests, linear, lora, native = line.split()
            steps.append(Step(float(start), float(seconds), int(tokens), int(requests),
                              float(linear), float(lora), float(native)))
    return steps


class Clock:
    """Seconds spent in the calls timed, by part, since the last :meth:`lap`."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    def time(self, owner: type, name: str, part: str) -> None:
        """Count the seconds in ``owner.name`` (a method) towards ``part``. Its own wrapper,
        not :func:`_timed`'s: hundreds of calls a step, where a callback each added 0.1-0.4
        us to a timer that step_parts compares with older commits' timers."""
        original = getattr(owner, name)
        parts, clock = self.parts, time.perf_counter

        @functools.wraps(original)
        def timed(*args, **kwargs):
            started = clock()
            try:
                return original(*args, **kwargs)
            finally:
                parts[part] = parts.get(part, 0.0) + clock() - started

        setattr(owner, name, timed)

    def lap(self) -> dict[str, float]:
        parts = dict(self.parts)
        self.parts.clear()
        return parts


def _timed(owner, name: str, done) -> None:
    """Wrap ``owner.name`` so that each call, returned or raised, is followed by
    ``done(started, seconds)`` (``time.monotonic``, the same clock in every process): for
    calls a few a load, not a few hundred a step (:meth:`Clock.time`)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        started = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            done(started, time.monotonic() - started)

    setattr(owner, name, timed)


class _Lines:
    """The file ``NAME.PID`` of the process that writes, lines appended to it, made on
    the first (a process with nothing to write leaves none)."""

    def __init__(self, name: str):
        self.name, self._file = name, None

    def write(self, line: str) -> None:
        if self._file is None:
            self._file = open(f"{self.name}.{os.getpid()}", "a",  # noqa: SIM115 - kept open
                              buffering=1)
        self._file.write(line + "\n")


def install(prefix: str) -> None:
    """Time vLLM's worker steps and their parts into ``prefix.PID``."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsLinearMethod,
    )
    from vllm.v1.worker.gpu_worker import Worker

    from zoo.serve import layer_routes
    from zoo.serve.fast_lora import GroupedPunicaWrapperCPU
    from zoo.serve.native import Kernel

    if getattr(Worker.execute_model, "_zoo_timed", False):
        return
    clock = Clock()
    for method in (UnquantizedLinearMethod, CompressedTensorsLinearMethod):
        clock.time(method, "apply", "linear")
    for name in ("add_lora_linear", "add_lora_prepared", "add_lora_logits",
                 "add_lora_embedding"):
        clock.time(GroupedPunicaWrapperCPU, name, "lora")
    clock.time(layer_routes, "route", "lora")  # the step's routing, int8 rows of new slots
    clock.time(Kernel, "gather", "native")
    execute_model, sample_tokens = Worker.execute_model, Worker.sample_tokens
    out = _Lines(prefix)
    pending = []  # a step whose tokens are sampled by the next call

    def write(started: float, scheduler_output) -> None:
        seconds = time.monotonic() - started
        parts = clock.lap()
        out.write(f"{started:.6f} {seconds:.6f} "
                  f"{scheduler_output.total_num_scheduled_tokens} "
                  f"{len(scheduler_output.num_scheduled_tokens)} "
                  f"{parts.get('linear', 0.0):.6f} {parts.get('lora', 0.0):.6f} "
                  f"{parts.get('native', 0.0):.6f}")

    @functools.wraps(execute_model)
    def timed_execute_model(self, scheduler_output, *args, **kwargs):
        pending.clear()
        clock.lap()
        started = time.monotonic()
        output = None
        try:
            output = execute_model(self, scheduler_output, *args, **kwargs)
            return output
        finally:
            if output is None and scheduler_output.total_num_scheduled_tokens:
                pending.append((started, scheduler_output))  # sample_tokens ends the step
            else:
                write(started, scheduler_output)

    @functools.wraps(sample_tokens)
    def timed_sample_tokens(self, *args, **kwargs):
        try:
            return sample_tokens(self, *args, **kwargs)
        finally:
            if pending:
                write(*pending.pop())

    timed_execute_model._zoo_timed = True
    Worker.execute_model, Worker.sample_tokens = timed_execute_model, timed_sample_tokens
    _time_loads(prefix)


def _time_loads(prefix: str) -> None:
    """Each load's line (the module's docstring) into ``prefix-loads.PID``."""
    from vllm.v1.worker.gpu_worker import Worker

    from zoo.serve import core_reading, first_use

    out = _Lines(f"{prefix}-loads")
    for owner, name, kind in ((first_use, "_begin_load", "begin"),
                              (first_use, "_make_room", "wait"),
                              (core_reading, "read", "read"), (Worker, "add_lora", "add_lora")):
        _timed(owner, name, lambda started, seconds, kind=kind:
               out.write(f"{kind} {started:.6f} {seconds:.6f}"))
