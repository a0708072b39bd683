"""The worker's step timers for benchmarks (zoo/serve/step_times.py): each step's line
holds its seconds, what the scheduler gave it and the seconds in its parts."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from zoo.serve import step_times


def test_a_clock_counts_each_part_until_its_lap():
    class Layer:
        def apply(self, seconds):
            time.sleep(seconds)
            return seconds

        def fail(self):
            raise ValueError("bad input")

    clock = step_times.Clock()
    clock.time(Layer, "apply", "linear")
    clock.time(Layer, "fail", "linear")
    layer = Layer()
    assert layer.apply(0.01) == 0.01 and layer.apply(0.02) == 0.02
    with pytest.raises(ValueError, match="bad input"):  # counted, and raised as it was
        layer.fail()
    first = clock.lap()
    assert 0.03 <= first["linear"] < 0.5
    assert clock.lap() == {}


@pytest.fixture
def worker(monkeypatch):
    """vLLM's worker, linear method and zoo's LoRA wrapper with stand-ins for the methods
    the timers wrap (restored after the test): a step runs 20 ms of linear layers and
    10 ms of LoRA work (2 ms of it routing the layers), 5 ms of it in the native kernel,
    and leaves its sampling to ``sample_tokens`` unless told."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsLinearMethod,
    )
    from vllm.v1.worker.gpu_worker import Worker

    from zoo.serve import layer_routes
    from zoo.serve.fast_lora import GroupedPunicaWrapperCPU
    from zoo.serve.native import Kernel

    def linear(self, layer, x, bias=None):
        time.sleep(0.01)

    def gather(self, *args):
        time.sleep(0.005)
        return True

    def lora(self, *args, **kwargs):
        Kernel.gather(None)
        time.sleep(0.003)

    def route(manager):
        time.sleep(0.002)

    def execute_model(self, scheduler_output):
        CompressedTensorsLinearMethod.apply(None, None, None)
        UnquantizedLinearMethod.apply(None, None, None)
        layer_routes.route(None)
        GroupedPunicaWrapperCPU.add_lora_linear(None)
        return "output" if self.samples_at_once else None

    def sample_tokens(self, grammar_output):
        time.sleep(0.005)
        return "sampled"

    for method in (UnquantizedLinearMethod, CompressedTensorsLinearMethod):
        monkeypatch.setattr(method, "apply", linear)
    for name in ("add_lora_linear", "add_lora_prepared", "add_lora_logits",
                 "add_lora_embedding"):
        monkeypatch.setattr(GroupedPunicaWrapperCPU, name, lora)
    monkeypatch.setattr(layer_routes, "route", route)
    monkeypatch.setattr(Kernel, "gather", gather)
    monkeypatch.setattr(Worker, "execute_model", execute_model)
    monkeypatch.setattr(Worker, "sample_tokens", sample_tokens)
    # what the load timers wrap, as they are (restored after the test)
    from zoo.serve import core_reading, first_use

    for owner, name in ((Worker, "add_lora"), (first_use, "_begin_load"),
                        (first_use, "_make_room"), (core_reading, "read")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    return Worker


def test_the_worker_writes_a_line_a_step_with_its_parts(worker, tmp_path):
    prefix = tmp_path / "steps"
    step_times.install(str(prefix))
    step_times.install(str(prefix))  # once is enough: a second install changes nothing
    scheduled = SimpleNamespace(total_num_scheduled_tokens=70,
                                num_scheduled_tokens={"a": 64, "b": 6})
    me = SimpleNamespace(samples_at_once=False)
    before = time.monotonic()
    assert worker.execute_model(me, scheduled) is None
    assert worker.sample_tokens(me, None) == "sampled"
    me.samples_at_once = True
    assert worker.execute_model(me, scheduled) == "output"
    idle = SimpleNamespace(total_num_scheduled_tokens=0, num_scheduled_tokens={})
    assert worker.execute_model(SimpleNamespace(samples_at_once=False), idle) is None

    steps = step_times.read(f"{prefix}.{os.getpid()}")
    assert [(s.tokens, s.requests) for s in steps] == [(70, 2), (70, 2), (0, 0)]
    sampled_apart, sampled_at_once, _idle = steps
    assert before <= sampled_apart.start < sampled_at_once.start
    for step in (sampled_apart, sampled_at_once):
        assert 0.02 <= step.linear < 0.5 and 0.01 <= step.lora < 0.5
        assert 0.005 <= step.native < step.lora - 0.004
        assert step.seconds >= step.linear + step.lora and step.rest >= 0
    assert sampled_apart.seconds >= sampled_apart.linear + sampled_apart.lora + 0.005


def test_each_load_is_a_line_in_the_process_that_ran_it(worker, tmp_path, monkeypatch):
    """The engine core's loads begun, its waits for room and its own reads within them,
    the worker's add_lora: a line each, with its kind, start and seconds; a load that
    fails is timed too."""
    from zoo.serve import core_reading, first_use

    def read(context, lora_request):
        time.sleep(0.02)
        return "model"

    def make_room(core):
        time.sleep(0.015)

    def begin_load(core, lora):
        first_use._make_room(core)
        time.sleep(0.01)
        return core_reading.read(None, lora) if core.reads else "sent the path"

    def add_lora(self, lora_request):
        time.sleep(0.03)
        if lora_request == "bad":
            raise ValueError("no such adapter")
        return True

    monkeypatch.setattr(core_reading, "read", read)
    monkeypatch.setattr(first_use, "_begin_load", begin_load)
    monkeypatch.setattr(first_use, "_make_room", make_room)
    monkeypatch.setattr(worker, "add_lora", add_lora)
    prefix = tmp_path / "steps"
    step_times.install(str(prefix))
    before = time.monotonic()
    assert first_use._begin_load(SimpleNamespace(reads=True), "a") == "model"
    assert first_use._begin_load(SimpleNamespace(reads=False), "b") == "sent the path"
    assert worker.add_lora(None, "a") is True
    with pytest.raises(ValueError, match="no such adapter"):
        worker.add_lora(None, "bad")

    loads = step_times.read_loads(f"{prefix}-loads.{os.getpid()}")
    assert [load.kind for load in loads] == ["wait", "read", "begin", "wait", "begin",
                                             "add_lora", "add_lora"]
    waited, read_, begun_reading, _, begun_sending, added, failed = loads
    assert before <= begun_reading.start <= waited.start < waited.end <= read_.start
    assert read_.end <= begun_reading.end
    assert 0.015 <= waited.seconds < 0.5 and 0.02 <= read_.seconds < 0.5
    assert 0.045 <= begun_reading.seconds < 0.5 and 0.025 <= begun_sending.seconds < 0.5
    assert begun_reading.end <= begun_sending.start < added.start < failed.start
    assert 0.03 <= added.seconds < 0.5 and 0.03 <= failed.seconds < 0.5
    assert not list(tmp_path.glob("steps.*"))  # no step ran: the steps' file is not made
