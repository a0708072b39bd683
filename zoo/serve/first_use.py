"""An adapter's first request is served one engine step sooner.

vLLM's API server answers a request for an adapter it has not loaded by asking
the resolvers for it and then *awaiting* ``add_lora`` on the engine core before
it submits the request. The engine core handles that call only between two
steps, so the request reaches the core during the next step and waits for it
to end too: under load, a cold adapter's first token costs a whole extra step
(about 0.3-0.5 s with 63 adapters decoding on 2 cores) on top of the load.

With these two runtime patches (installed by zoo's vLLM plugin, ``zoo serve``
only; ``ZOO_FAST_FIRST_USE=0`` keeps vLLM's way):

* the API server registers what a resolver found and submits the request at
  once; ``add_lora`` still goes to the core, in the background, and a failure
  is logged. The name stays registered: vLLM checks a request's name and then
  looks it up, and a failure forgetting it in between made that request a 404.
  The core has not loaded the adapter, so it tries again on the next request
  (and fails that one with the reason); new content under the name is unloaded
  and resolved afresh (``middleware.py``);
* the engine core begins a request's adapter's load when the request arrives,
  before it is scheduled, so the load happens at the same step boundary. Where the
  worker allows, the core reads every other adapter itself and sends it to the worker
  to place (``core_reading.py``), and leaves the others to the worker to read: the
  loads a burst of new adapters brings are read on both CPUs at once (the worker has
  nothing else to do until they are placed). It sends without waiting (at most
  ``IN_FLIGHT`` unanswered); the requests wait in the core until their loads
  are confirmed, once, before the next step. An adapter that fails to load fails its
  requests (HTTP 500, logged) instead of the engine step. The core remembers what it
  had the worker load, so the API server's ``add_lora`` for the same adapter
  (whichever comes first) begins no second load, and is answered when the load is
  confirmed, the core not waiting for it then (``load_inplace`` always goes through;
  ``remove_lora`` forgets). A request aborted while it waits is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field

logger = logging.getLogger("zoo.serve")
IN_FLIGHT = 4  # loads sent to the worker and not answered yet, at most

_background: set[asyncio.Task] = set()  # the running confirmations (asyncio keeps weak refs)


def install_api_side() -> None:
    """Patch the API server's ``OpenAIServingModels.resolve_lora``."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    original = OpenAIServingModels.resolve_lora
    if getattr(original, "_zoo", False):
        return

    async def resolve_lora(self, lora_name: str):
        async with self.lora_resolver_lock[lora_name]:
            if lora_name in self.lora_requests:
                return self.lora_requests[lora_name]
            for resolver in self.lora_resolvers:
                request = await resolver.resolve_lora(self.model_config.model, lora_name)
                if request is not None:
                    request.lora_int_id = self.lora_id_counter.inc(1)
                    self.lora_requests[lora_name] = request
                    task = asyncio.get_running_loop().create_task(
                        _confirm(self, lora_name, request))
                    _background.add(task)
                    task.add_done_callback(_background.discard)
                    return request
        return await original(self, lora_name)  # nothing found: vLLM's own answer

    resolve_lora._zoo = True
    OpenAIServingModels.resolve_lora = resolve_lora


async def _confirm(models, lora_name: str, request) -> None:
    from zoo.serve.policy import LOAD_FAILURES

    try:
        await models.engine_client.add_lora(request)
    except Exception as error:  # noqa: BLE001 - any failure: say why, keep the name
        logger.warning("zoo: adapter %r could not be loaded: %s", lora_name, error)
        LOAD_FAILURES[lora_name] = str(error)
    else:
        LOAD_FAILURES.pop(lora_name, None)


def install_core_side() -> None:
    """Patch the engine core: ``add_request`` (a new adapter's load begun on arrival, its
    requests held until it is placed), ``_process_input_queue`` and ``has_work`` (the
    held requests handed to vLLM before the next step), ``abort_requests`` (a held one
    dropped), ``add_lora`` and ``remove_lora`` (what the worker has loaded,
    remembered)."""
    from vllm.v1.engine.core import EngineCore, EngineCoreProc

    original = EngineCore.add_request
    if getattr(original, "_zoo", False):
        return
    add_lora, remove_lora = EngineCore.add_lora, EngineCore.remove_lora
    abort_requests = EngineCore.abort_requests
    process_input_queue, has_work = EngineCoreProc._process_input_queue, EngineCoreProc.has_work

    def add_request(self, request, *args, **kwargs):
        lora = request.lora_request
        # asked here, not left to add_lora: a request never reloads its adapter, even
        # one the API server registered with load_inplace (add_lora would, each time)
        if lora is None or lora.lora_int_id in _loaded(self):
            return original(self, request, *args, **kwargs)
        held = _held(self)
        if lora.lora_int_id not in held.loads:
            try:
                held.loads[lora.lora_int_id] = _begin_load(self, lora)
            except Exception as error:
                _fail(self, request, error)
                return None
        held.requests.append((request, args, kwargs))
        if not isinstance(self, EngineCoreProc):  # no loop to hand them over: now
            admit(self)
        return None

    def admit(self) -> None:
        """Wait for every load begun, then hand the held requests to vLLM in the order
        they came, or fail those whose adapter did not load, and answer the add_lora
        calls waiting."""
        held = _held(self)
        failed = {}
        for lora_id, answers in held.loads.items():
            try:
                if all(answers.result()):
                    _loaded(self).add(lora_id)
            except Exception as error:
                failed[lora_id] = error
        requests, waiters = held.requests, held.waiters
        held.loads, held.requests, held.waiters = {}, [], {}
        for request, args, kwargs in requests:
            error = failed.get(request.lora_request.lora_int_id)
            if error is None:
                original(self, request, *args, **kwargs)
            else:
                _fail(self, request, error)
        for lora_id, answers in waiters.items():
            for answer in answers:
                if lora_id in failed:
                    answer.set_exception(failed[lora_id])
                else:
                    answer.set_result(lora_id in _loaded(self))

    @functools.wraps(process_input_queue)
    def admitting_process_input_queue(self):
        process_input_queue(self)
        admit(self)

    @functools.wraps(has_work)
    def has_work_or_held(self) -> bool:
        return has_work(self) or bool(_held(self).loads)  # a held request's load is there

    # vLLM decodes a utility call's arguments by the method's signature: keep theirs
    @functools.wraps(add_lora)
    def remembering_add_lora(self, lora_request) -> bool | Future:
        lora_id = lora_request.lora_int_id
        if lora_request.load_inplace:
            added = add_lora(self, lora_request)
            if added:
                _loaded(self).add(lora_id)
            return added
        if lora_id in _loaded(self):
            return True
        held = _held(self)
        if lora_id not in held.loads:
            held.loads[lora_id] = _begin_load(self, lora_request)
        answer = Future()  # answered as the load is confirmed, before the next step
        held.waiters.setdefault(lora_id, []).append(answer)
        if not isinstance(self, EngineCoreProc):  # no loop to answer it: now
            admit(self)
            return answer.result()
        return answer

    @functools.wraps(abort_requests)
    def dropping_abort_requests(self, request_ids):
        held = _held(self)
        if held.requests:
            ids = set(request_ids)
            held.requests = [r for r in held.requests if r[0].request_id not in ids]
        return abort_requests(self, request_ids)

    @functools.wraps(remove_lora)
    def forgetting_remove_lora(self, lora_id: int) -> bool:
        _loaded(self).discard(lora_id)
        return remove_lora(self, lora_id)

    add_request._zoo = True
    EngineCore.add_request = add_request
    EngineCore.add_lora = remembering_add_lora
    EngineCore.remove_lora = forgetting_remove_lora
    EngineCore.abort_requests = dropping_abort_requests
    EngineCoreProc._process_input_queue = admitting_process_input_queue
    EngineCoreProc.has_work = has_work_or_held


@dataclass
class _Held:
    """The loads an engine core began and not yet confirmed (each a future of the
    workers' answers), the requests waiting for them, in the order they came, and the
    API server's add_lora calls waiting for them (futures vLLM answers when set)."""

    loads: dict[int, Future] = field(default_factory=dict)
    requests: list[tuple] = field(default_factory=list)
    waiters: dict[int, list[Future]] = field(default_factory=dict)


def _held(core) -> _Held:
    return core.__dict__.setdefault("_zoo_held", _Held())


def _make_room(core) -> None:
    """Wait for the oldest load sent while IN_FLIGHT are unanswered: vLLM's queues to and
    from the worker hold a few messages each, and a worker that cannot answer takes no
    more (both would wait)."""
    in_flight = [load for load in _held(core).loads.values() if not load.done()]
    if len(in_flight) >= IN_FLIGHT:
        with contextlib.suppress(Exception):  # admit() reads its outcome
            in_flight[0].result()


def _begin_load(core, lora) -> Future:
    """The adapter's load, sent to the worker without waiting. Where the worker said how
    (core_reading.py), every other one is read here and placed there, the rest read
    there; else the worker reads them all. A bad adapter raises here when it is read
    here, else its load's answer does."""
    from zoo.serve import core_reading

    _make_room(core)
    context = core.__dict__.get("_zoo_reading_context", False)
    if context is False and core_reading.handing_over():
        context = core.model_executor.collective_rpc(core_reading.context_of)[0]
        core.__dict__["_zoo_reading_context"] = context
    begun = core.__dict__.get("_zoo_loads_begun", 0)
    core.__dict__["_zoo_loads_begun"] = begun + 1
    if context and begun % 2:  # the worker reads the first (it waits for it anyway)
        return core.model_executor.collective_rpc(
            core_reading.place, args=(lora, core_reading.read(context, lora)), non_block=True)
    return core.model_executor.collective_rpc("add_lora", args=(lora,), non_block=True)


def _fail(core, request, error: Exception) -> None:
    """The request fails for its adapter (HTTP 500 to its client, the reason logged)."""
    fail = getattr(core, "_send_error_outputs_to_client", None)
    if fail is None:  # an in-process core has no client to answer
        raise error
    logger.warning("zoo: adapter %r could not be loaded, request %s fails: %s",
                   request.lora_request.lora_name, request.request_id, error)
    fail([request.request_id], request.client_index)


def _loaded(core) -> set[int]:
    """The adapter ids the core had its worker load (the worker may have let some go
    since: a step loads what it needs again, as in vLLM)."""
    return core.__dict__.setdefault("_zoo_loaded_loras", set())
