"""A vLLM LoRA resolver backed by the zoo registry.

vLLM asks it for an adapter by name when a request names one the engine has
not loaded. It answers only for servable LoRA/QLoRA adapters of the served
base whose files are intact, and, when the server has tenants, only for a
request the middleware vetted whose tenant may use that adapter (the
middleware's decision travels in a context variable); anything else is None,
and vLLM answers 404. The names it is asked for are versions (``NAME:vN``: the
middleware turns a request for ``NAME`` into the version that answers it), so
two versions are two LoRAs to vLLM, with cache keys of their own. What it loads
is remembered by content hash, so a name re-registered with other weights is
reloaded, not served stale, and listed in the server's lease in the home
(``zoo gc`` keeps the versions a running server answers with).
"""

from __future__ import annotations

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from zoo.catalog.versions import record_in_use
from zoo.serve.policy import (
    LOAD_COUNT,
    LOADED_HASHES,
    NOT_VETTED,
    REQUEST_TENANT,
    ServePolicy,
    shared_policy,
)


class RegistryResolver(LoRAResolver):
    def __init__(self, policy: ServePolicy, engine_rescales: bool = False):
        self.policy = policy
        # the engine rescales adapters for a smoothed base as it loads them (the plugin's
        # smoothed_lora patch applied); else they are handed over as rescaled copies
        self.engine_rescales = engine_rescales

    @classmethod
    def from_environment(cls, engine_rescales: bool = False) -> RegistryResolver:
        return cls(shared_policy(), engine_rescales)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if self.policy.current_tenants() is not None:
            tenant = REQUEST_TENANT.get()
            if tenant is NOT_VETTED or not self.policy.authorize(tenant, lora_name).ok:
                return None
        decision = self.policy.adapter(lora_name)
        if decision.path is None:
            return None
        LOADED_HASHES[lora_name] = decision.content_hash
        LOAD_COUNT[0] += 1
        record_in_use(self.policy.registry.home, set(LOADED_HASHES))
        path = decision.path
        if not self.engine_rescales:
            path = self.policy.lora_path(lora_name, decision.path, decision.content_hash)
        # vLLM replaces the id with its own counter
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

