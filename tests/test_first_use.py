"""The engine core's side of zoo/serve/first_use.py, on vLLM's own EngineCore methods
with a stand-in executor: what the worker was asked to load."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
from vllm.lora.request import LoRARequest


def _core(answer=True):
    """An engine core's state as the patched methods see it, its executor recording
    every add_lora and remove_lora it is asked for."""
    asked = []

    def add_lora(request):
        asked.append(("add", request.lora_int_id))
        if isinstance(answer, Exception):
            raise answer
        return answer

    executor = SimpleNamespace(add_lora=add_lora,
                               remove_lora=lambda i: asked.append(("remove", i)) or True)
    return SimpleNamespace(model_executor=executor), asked


def test_the_worker_loads_an_adapter_once_whoever_asks_first(monkeypatch):
    """The request's arrival and the API server's add_lora for the same adapter: one
    load in the worker, in either order; load_inplace reloads; remove_lora forgets;
    a load that failed or was refused is asked for again next time."""
    from vllm.v1.engine.core import EngineCore

    from zoo.serve.first_use import install_core_side

    for name in ("add_request", "add_lora", "remove_lora"):  # vLLM's own again after
        monkeypatch.setattr(EngineCore, name, getattr(EngineCore, name))
    theirs = {name: inspect.signature(getattr(EngineCore, name))
              for name in ("add_lora", "remove_lora")}
    install_core_side()
    # the engine core decodes a utility call's arguments by the method's signature
    assert {name: inspect.signature(getattr(EngineCore, name)) for name in theirs} == theirs
    lora = LoRARequest("acme/a:v1", 7, "/adapters/a")
    for first_arrival in (True, False):
        core, asked = _core()
        request = SimpleNamespace(lora_request=lora, request_id="r1", client_index=0)
        core.add_lora = lambda r, core=core: EngineCore.add_lora(core, r)
        if first_arrival:
            with pytest.raises(AttributeError):  # vLLM's own add_request needs a scheduler
                EngineCore.add_request(core, request)
            assert EngineCore.add_lora(core, lora) is True
        else:
            assert EngineCore.add_lora(core, lora) is True
            with pytest.raises(AttributeError):
                EngineCore.add_request(core, request)
        assert asked == [("add", 7)]
    assert EngineCore.add_lora(core, LoRARequest("acme/a:v1", 7, "/a", load_inplace=True))
    assert asked == [("add", 7), ("add", 7)]
    EngineCore.remove_lora(core, 7)
    EngineCore.add_lora(core, lora)
    assert asked == [("add", 7), ("add", 7), ("remove", 7), ("add", 7)]

    for answer in (False, ValueError("refused")):
        core, asked = _core(answer)
        for _ in range(2):
            try:
                EngineCore.add_lora(core, lora)
            except ValueError:
                pass
        assert asked == [("add", 7), ("add", 7)]
