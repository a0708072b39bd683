"""zoo/serve/first_use.py on vLLM's own methods. The engine core's side, with a
stand-in executor and scheduler: what the worker was asked to load, which requests
wait for it and in which order they reach the scheduler. The API server's side, with a
stand-in resolver and engine client: what stays registered when a load fails."""

from __future__ import annotations

import asyncio
import inspect
import queue
from collections import defaultdict
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from vllm.lora.request import LoRARequest

from zoo.serve import core_reading


class Executor:
    """What the engine core asks of its executor, recorded. A load's answer is a future
    the test settles (``answers``), else settled at once with ``answer``."""

    def __init__(self, answer=True):
        self.answer, self.asked, self.answers = answer, [], {}

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
        if method is core_reading.context_of:
            return [None]  # the worker does not let the core read: it reads itself
        assert method == "add_lora" and non_block
        lora_id = args[0].lora_int_id
        self.asked.append(("add", lora_id))
        future = self.answers.pop(lora_id, None)
        if future is None:
            future = Future()
            if isinstance(self.answer, Exception):
                future.set_exception(self.answer)
            else:
                future.set_result([self.answer])
        return future

    def add_lora(self, request):  # vLLM's EngineCore.add_lora, for load_inplace
        self.asked.append(("add", request.lora_int_id))
        return self.answer

    def remove_lora(self, lora_id):
        self.asked.append(("remove", lora_id))
        return True


@pytest.fixture
def core_side(monkeypatch):
    """first_use's engine-core patches for one test (vLLM's own methods after)."""
    from vllm.v1.engine.core import EngineCore, EngineCoreProc

    from zoo.serve.first_use import install_core_side

    for name in ("add_request", "add_lora", "remove_lora", "abort_requests"):
        monkeypatch.setattr(EngineCore, name, getattr(EngineCore, name))
    for name in ("_process_input_queue", "has_work"):
        monkeypatch.setattr(EngineCoreProc, name, getattr(EngineCoreProc, name))
    theirs = {name: inspect.signature(getattr(EngineCore, name))
              for name in ("add_lora", "remove_lora")}
    install_core_side()
    # the engine core decodes a utility call's arguments by the method's signature
    assert {name: inspect.signature(getattr(EngineCore, name)) for name in theirs} == theirs
    return EngineCore, EngineCoreProc


def _request(request_id: str, lora: LoRARequest | None):
    return SimpleNamespace(request_id=request_id, lora_request=lora, client_index=0,
                           pooling_params=None, kv_transfer_params=None,
                           ec_transfer_params=None, abort_immediately=False)


def test_the_worker_loads_an_adapter_once_whoever_asks_first(core_side):
    """The request's arrival and the API server's add_lora for the same adapter: one
    load in the worker, in either order; load_inplace reloads; remove_lora forgets;
    a load that failed or was refused is asked for again next time."""
    EngineCore, _ = core_side
    lora = LoRARequest("acme/a:v1", 7, "/adapters/a")
    for first_arrival in (True, False):
        executor = Executor()
        core = SimpleNamespace(model_executor=executor)
        core.add_lora = lambda r, core=core: EngineCore.add_lora(core, r)
        if first_arrival:
            with pytest.raises(AttributeError):  # vLLM's own add_request needs a scheduler
                EngineCore.add_request(core, _request("r1", lora))
            assert EngineCore.add_lora(core, lora) is True
        else:
            assert EngineCore.add_lora(core, lora) is True
            with pytest.raises(AttributeError):
                EngineCore.add_request(core, _request("r1", lora))
        assert executor.asked == [("add", 7)]
    assert EngineCore.add_lora(core, LoRARequest("acme/a:v1", 7, "/a", load_inplace=True))
    assert executor.asked == [("add", 7), ("add", 7)]
    EngineCore.remove_lora(core, 7)
    EngineCore.add_lora(core, lora)
    assert executor.asked == [("add", 7), ("add", 7), ("remove", 7), ("add", 7)]

    for answer in (False, ValueError("refused")):
        executor = Executor(answer)
        core = SimpleNamespace(model_executor=executor)
        for _ in range(2):
            try:
                EngineCore.add_lora(core, lora)
            except ValueError:
                pass
        assert executor.asked == [("add", 7), ("add", 7)]


def test_requests_wait_for_their_adapters_load_and_keep_their_order(core_side):
    """In the engine core's loop: a cold adapter's requests wait (the loop still steps
    for them) until the input queue is done with, then reach the scheduler in the order
    they came, behind none of the others; one load per adapter; a failed load fails its
    requests only, and is tried afresh next time; an aborted request waiting is
    dropped; the API server's add_lora is answered when the load is confirmed, the
    core not waiting for it then."""
    from zoo.serve.first_use import _held

    EngineCore, EngineCoreProc = core_side
    executor = Executor()
    scheduled, failed = [], []
    scheduler = SimpleNamespace(add_request=lambda r: scheduled.append(r.request_id),
                                has_requests=lambda: bool(scheduled),
                                finish_requests=lambda ids, status: None)
    core = EngineCoreProc.__new__(EngineCoreProc)
    core.__dict__.update(model_executor=executor, scheduler=scheduler, batch_queue=None,
                         engines_running=False, input_queue=queue.Queue(),
                         _send_error_outputs_to_client=lambda ids, index: failed.extend(ids))
    core.add_lora = lambda r: EngineCore.add_lora(core, r)
    a, b = LoRARequest("acme/a:v1", 7, "/a"), LoRARequest("acme/b:v1", 8, "/b")
    executor.answers = {7: Future(), 8: Future()}  # the worker busy with both
    assert not EngineCoreProc.has_work(core)
    for request_id, lora in (("r1", a), ("r2", b), ("r3", a), ("r4", None), ("r5", a)):
        EngineCore.add_request(core, _request(request_id, lora))
    assert scheduled == ["r4"] and executor.asked == [("add", 7), ("add", 8)]
    scheduled.clear()
    assert EngineCoreProc.has_work(core)  # the loop goes on to admit them
    EngineCore.abort_requests(core, ["r3"])
    assert [r.request_id for r, _, _ in _held(core).requests] == ["r1", "r2", "r5"]

    executor.answers.clear()
    [load_a, load_b] = _held(core).loads.values()
    load_a.set_result([True])
    load_b.set_exception(RuntimeError("Worker failed"))
    EngineCoreProc._process_input_queue(core)
    assert scheduled == ["r1", "r5"] and failed == ["r2"]
    assert not _held(core).requests and not _held(core).loads
    EngineCore.add_request(core, _request("r6", a))  # loaded: straight in
    EngineCore.add_request(core, _request("r7", b))  # failed before: loaded afresh
    assert scheduled == ["r1", "r5", "r6"]
    assert executor.asked == [("add", 7), ("add", 8), ("add", 8)]

    c, d = LoRARequest("acme/c:v1", 9, "/c"), LoRARequest("acme/d:v1", 10, "/d")
    EngineCore.add_request(core, _request("r8", c))
    answer_c = EngineCore.add_lora(core, c)  # the API server's: answered when confirmed
    answer_d = EngineCore.add_lora(core, d)  # before its request: the load begins
    EngineCore.add_request(core, _request("r9", d))
    assert not answer_c.done() and not answer_d.done()
    assert scheduled == ["r1", "r5", "r6"] and EngineCoreProc.has_work(core)
    EngineCoreProc._process_input_queue(core)
    assert answer_c.result() is True and answer_d.result() is True
    assert scheduled == ["r1", "r5", "r6", "r7", "r8", "r9"]
    assert executor.asked.count(("add", 9)) == executor.asked.count(("add", 10)) == 1
    load_e = executor.answers[11] = Future()
    answer_e = EngineCore.add_lora(core, LoRARequest("acme/e:v1", 11, "/e"))
    assert EngineCoreProc.has_work(core)  # no request waits, the answer does
    load_e.set_exception(RuntimeError("Worker failed"))
    EngineCoreProc._process_input_queue(core)
    with pytest.raises(RuntimeError):
        answer_e.result()
    assert not EngineCoreProc.has_work(SimpleNamespace(
        engines_running=False, batch_queue=None, scheduler=SimpleNamespace(
            has_requests=lambda: False)))


def test_the_core_and_the_worker_read_a_bursts_adapters_in_turn(core_side, monkeypatch):
    """Where the worker lets the core read (core_reading.py), cold adapters are read in
    turn: the first by the worker (its own add_lora), the next by the core and sent to
    the worker to place, and so on; the requests reach the scheduler in the order they
    came once every load is confirmed."""
    EngineCore, EngineCoreProc = core_side
    context = object()
    read = []

    class Reading(Executor):
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None,
                           non_block=False):
            if method is core_reading.context_of:
                return [context]
            if method is core_reading.place:
                assert non_block and args[1] == ("model of", args[0].lora_int_id)
                self.asked.append(("place", args[0].lora_int_id))
                future = Future()
                future.set_result([True])
                return future
            return super().collective_rpc(method, timeout, args, kwargs, non_block)

    monkeypatch.setattr(core_reading, "handing_over", lambda: True)
    monkeypatch.setattr(core_reading, "read", lambda ctx, lora: (
        ctx is context and read.append(lora.lora_int_id), ("model of", lora.lora_int_id))[1])
    executor, scheduled = Reading(), []
    core = EngineCoreProc.__new__(EngineCoreProc)
    core.__dict__.update(model_executor=executor, batch_queue=None, engines_running=False,
                         input_queue=queue.Queue(), scheduler=SimpleNamespace(
                             add_request=lambda r: scheduled.append(r.request_id),
                             has_requests=lambda: bool(scheduled)))
    for lora_id in range(1, 6):
        EngineCore.add_request(core, _request(f"r{lora_id}", LoRARequest(
            f"acme/{lora_id}:v1", lora_id, f"/{lora_id}")))
    assert executor.asked == [("add", 1), ("place", 2), ("add", 3), ("place", 4), ("add", 5)]
    assert read == [2, 4] and not scheduled
    EngineCoreProc._process_input_queue(core)
    assert scheduled == ["r1", "r2", "r3", "r4", "r5"]


def test_a_bad_adapter_fails_its_request_when_it_is_read(core_side, monkeypatch):
    """Read in the engine core (core_reading.py), an adapter vLLM refuses fails its
    request there, before anything is sent to the worker."""
    from zoo.serve import first_use

    EngineCore, EngineCoreProc = core_side
    executor = Executor()
    failed = []
    core = EngineCoreProc.__new__(EngineCoreProc)
    core.__dict__.update(model_executor=executor,
                         _send_error_outputs_to_client=lambda ids, index: failed.extend(ids))

    def refuse(core, lora):
        raise ValueError("vLLM does not yet support DoRA")

    monkeypatch.setattr(first_use, "_begin_load", refuse)
    EngineCore.add_request(core, _request("r1", LoRARequest("ops/dora:v1", 3, "/d")))
    assert failed == ["r1"] and not first_use._held(core).requests
    with pytest.raises(ValueError, match="DoRA"):
        EngineCore.add_lora(core, LoRARequest("ops/dora:v1", 3, "/d"))


def test_no_more_than_a_few_loads_go_unanswered(core_side):
    """vLLM's queues to and from the worker hold a few messages each: the core waits
    for the oldest load's answer before it sends one more than IN_FLIGHT (else the
    worker, unable to answer, and the core, unable to send, would both wait)."""
    from zoo.serve.first_use import IN_FLIGHT

    EngineCore, EngineCoreProc = core_side
    waited = []

    class Answer(Future):  # the worker's answer, read when the core asks for it
        def result(self, timeout=None):
            if not self.done():
                waited.append(self)
                self.set_result([True])
            return super().result(timeout)

    executor = Executor()
    scheduled = []
    core = EngineCoreProc.__new__(EngineCoreProc)
    core.__dict__.update(model_executor=executor, batch_queue=None, engines_running=False,
                         input_queue=queue.Queue(), scheduler=SimpleNamespace(
                             add_request=lambda r: scheduled.append(r.request_id),
                             has_requests=lambda: bool(scheduled)))
    count = IN_FLIGHT + 2
    answers = [Answer() for _ in range(count)]
    executor.answers = dict(enumerate(answers, start=1))
    for lora_id in range(1, count + 1):
        lora = LoRARequest(f"acme/{lora_id}:v1", lora_id, f"/{lora_id}")
        EngineCore.add_request(core, _request(f"r{lora_id}", lora))
    assert waited == answers[:2] and not scheduled
    EngineCoreProc._process_input_queue(core)
    assert scheduled == [f"r{i}" for i in range(1, count + 1)] and waited == answers


def test_a_name_stays_registered_when_its_background_load_fails(monkeypatch, caplog):
    """The API server registers a resolved adapter and confirms its load in the
    background. A failed load is logged and keeps the name: vLLM checks a request's
    name and then looks it up, so forgetting it in between turned the next request
    into a 404 (the engine core, which has not loaded it, fails that request with the
    reason instead)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.utils.counter import AtomicCounter

    from zoo.serve.first_use import install_api_side

    monkeypatch.setattr(OpenAIServingModels, "resolve_lora", OpenAIServingModels.resolve_lora)
    install_api_side()
    resolved, loads = [], []

    class Resolver:
        async def resolve_lora(self, base, name):
            resolved.append(name)
            return LoRARequest(name, 99, f"/adapters/{name}")  # the server numbers it

    class Engine:
        async def add_lora(self, request):
            loads.append(request.lora_int_id)
            raise ValueError("vLLM does not yet support DoRA")

    models = OpenAIServingModels.__new__(OpenAIServingModels)
    models.__dict__.update(
        lora_requests={}, lora_resolvers=[Resolver()], lora_id_counter=AtomicCounter(0),
        lora_resolver_lock=defaultdict(asyncio.Lock), engine_client=Engine(),
        model_config=SimpleNamespace(model="tiny"))

    async def twice():
        first = await models.resolve_lora("ops/dora")
        await asyncio.sleep(0.01)  # the background load fails meanwhile
        return first, await models.resolve_lora("ops/dora")

    with caplog.at_level("WARNING", logger="zoo.serve"):
        first, second = asyncio.run(twice())
    assert second is first and models.lora_requests == {"ops/dora": first}
    assert resolved == ["ops/dora"] and loads == [first.lora_int_id] == [1]
    assert "adapter 'ops/dora' could not be loaded: vLLM does not yet support DoRA" in caplog.text
