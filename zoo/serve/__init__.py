"""zoo serve: vLLM plugin, registry resolver, middleware, tenant policy, CPU LoRA path."""
