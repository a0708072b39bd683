"""A vLLM LoRA resolver backed by the zoo registry.

vLLM asks it for an adapter by name when a request names one the engine has
not loaded. It answers only for servable LoRA/QLoRA adapters of the served
base whose files are intact; anything else is None, and vLLM answers 404.
"""

from __future__ import annotations

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from zoo.serve.policy import ServePolicy


class RegistryResolver(LoRAResolver):
    def __init__(self, policy: ServePolicy):
        self.policy = policy

    @classmethod
    def from_environment(cls) -> RegistryResolver:
        return cls(ServePolicy.from_environment())

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        decision = self.policy.adapter(lora_name)
        if decision.path is None:
            return None
        # vLLM replaces the id with its own counter; the path is the stored copy
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(decision.path))

