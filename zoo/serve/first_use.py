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
  makes the server forget the name (the next request resolves it again);
* the engine core loads a request's adapter when the request arrives, before
  it is scheduled, so the load happens at the same step boundary; an adapter
  that fails to load fails that request (HTTP 500, logged) instead of the
  engine step. The core remembers what it had the worker load, so the API
  server's ``add_lora`` for the same adapter (whichever comes second) is
  answered without another round trip to the worker (``load_inplace`` always
  goes through; ``remove_lora`` forgets).
"""

from __future__ import annotations

import asyncio
import functools
import logging

logger = logging.getLogger("zoo.serve")

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
    try:
        await models.engine_client.add_lora(request)
    except BaseException as error:  # noqa: BLE001 - any failure: forget the name, log why
        if models.lora_requests.get(lora_name) is request:
            del models.lora_requests[lora_name]
        logger.warning("zoo: adapter %r could not be loaded: %s", lora_name, error)


def install_core_side() -> None:
    """Patch the engine core's ``add_request`` (load a new adapter on arrival) and its
    ``add_lora`` and ``remove_lora`` (what the worker has loaded, remembered)."""
    from vllm.v1.engine.core import EngineCore

    original = EngineCore.add_request
    if getattr(original, "_zoo", False):
        return
    add_lora, remove_lora = EngineCore.add_lora, EngineCore.remove_lora

    def add_request(self, request, *args, **kwargs):
        lora = request.lora_request
        # asked here, not left to add_lora: a request never reloads its adapter, even
        # one the API server registered with load_inplace (add_lora would, each time)
        if lora is not None and lora.lora_int_id not in _loaded(self):
            try:
                self.add_lora(lora)
            except Exception as error:
                fail = getattr(self, "_send_error_outputs_to_client", None)
                if fail is None:  # an in-process core has no client to answer
                    raise
                logger.warning("zoo: adapter %r could not be loaded, request %s fails: %s",
                               lora.lora_name, request.request_id, error)
                fail([request.request_id], request.client_index)
                return None
        return original(self, request, *args, **kwargs)

    # vLLM decodes a utility call's arguments by the method's signature: keep theirs
    @functools.wraps(add_lora)
    def remembering_add_lora(self, lora_request) -> bool:
        loaded = _loaded(self)
        if lora_request.lora_int_id in loaded and not lora_request.load_inplace:
            return True
        added = add_lora(self, lora_request)
        if added:
            loaded.add(lora_request.lora_int_id)
        return added

    @functools.wraps(remove_lora)
    def forgetting_remove_lora(self, lora_id: int) -> bool:
        _loaded(self).discard(lora_id)
        return remove_lora(self, lora_id)

    add_request._zoo = True
    EngineCore.add_request = add_request
    EngineCore.add_lora = remembering_add_lora
    EngineCore.remove_lora = forgetting_remove_lora


def _loaded(core) -> set[int]:
    """The adapter ids the core had its worker load (the worker may have let some go
    since: a step loads what it needs again, as in vLLM)."""
    return core.__dict__.setdefault("_zoo_loaded_loras", set())
