"""Greedy generations with vLLM's offline engine, for tests that compare LoRA paths.

    python tests/vllm_generate.py BASE_DIR OUT.json ADAPTER_DIR [ADAPTER_DIR ...]

One batch mixes the base and every adapter (so several adapters share steps);
writes ``{"name": [text, [logprob, ...]]}``. The LoRA path follows
``ZOO_FAST_LORA`` (zoo's plugin reads it in every vLLM process).
"""

import json
import sys

PROMPTS = ["Write a short story about a lighthouse keeper.", "Name three colours."]

if __name__ == "__main__":  # vLLM starts its workers with spawn
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base, out, adapters = sys.argv[1], sys.argv[2], sys.argv[3:]
    # one slot more than adapters: vLLM 0.32's own CPU ops apply the last slot's adapter to
    # tokens without one, so the reference path must never fill it
    llm = LLM(model=base, enable_lora=True, max_lora_rank=16, max_loras=len(adapters) + 1,
              dtype="float32",
              gpu_memory_utilization=0.5, max_model_len=1024, seed=0)
    requests = [(None, p) for p in PROMPTS] + [
        (LoRARequest(f"a{i}", i + 1, path), p) for i, path in enumerate(adapters) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=1)
    results = llm.chat([[{"role": "user", "content": p}] for _, p in requests], params,
                       lora_request=[lora for lora, _ in requests])
    report = {}
    for (lora, prompt), result in zip(requests, results, strict=True):
        completion = result.outputs[0]
        logprobs = [next(iter(step.values())).logprob for step in completion.logprobs]
        report[f"{lora.lora_name if lora else 'base'}: {prompt}"] = [completion.text, logprobs]
    with open(out, "w") as f:
        json.dump(report, f)
