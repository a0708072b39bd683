"""Scores and greedy answers from vLLM's offline engine, for tests that compare LoRA paths.

    python tests/vllm_generate.py BASE_DIR OUT.json ADAPTER_DIR [ADAPTER_DIR ...]

One batch mixes the base and every adapter (so many adapters share steps; vLLM's own
path scores one model at a time, below). For each model it writes the log-probability
of every token of one fixed text (teacher-forced, so a result never depends on an
earlier near-tie) and a short greedy answer, its tokens and, at each, how far the chosen
token's log-probability is above the next one's:
``{"model": {"scores": [...], "text": "...", "tokens": [...], "margins": [...]}}``. The
LoRA path follows ``ZOO_FAST_LORA`` (zoo's plugin reads it in every vLLM process); the
engine runs in this process, so what the plugin logs (which path is in use) is in this
script's output.
"""

import json
import os
import sys

SCORED = ("Question: Name three colours.\nAnswer: Red, green and blue are three colours; "
          "a lighthouse keeper paints the tower red and white.")
PROMPT = "Name three colours."

if __name__ == "__main__":  # vLLM starts its workers with spawn
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base, out, adapters = sys.argv[1], sys.argv[2], sys.argv[3:]
    # one slot more than adapters: vLLM 0.32's own CPU ops apply the last slot's adapter to
    # tokens without one, so the reference path must never fill it. float32 activations on
    # bf16 stacks (``--lora-dtype bfloat16``): the kernel's mixed path, end to end
    llm = LLM(model=base, enable_lora=True, max_lora_rank=16, max_loras=len(adapters) + 1,
              dtype="float32", lora_dtype="bfloat16", gpu_memory_utilization=0.5,
              max_model_len=1024, seed=0)
    loras = [None] + [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]
    names = ["base"] + [lora.lora_name for lora in loras[1:]]
    scoring = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    if os.environ.get("ZOO_FAST_LORA", "1") != "0":  # zoo's path: one mixed batch
        scored = llm.generate([SCORED] * len(loras), scoring, lora_request=loras)
    else:  # vLLM 0.32's own CPU path fails prompt log-probabilities of a mixed LoRA batch
        # (its logits LoRA indexes sequences, not prompt tokens): one request at a time
        scored = [llm.generate([SCORED], scoring, lora_request=[lora], use_tqdm=False)[0]
                  for lora in loras]
    answering = SamplingParams(temperature=0, max_tokens=16, logprobs=2)
    answers = llm.chat([[{"role": "user", "content": PROMPT}]] * len(loras), answering,
                       lora_request=loras)
    report = {}
    for name, score, answer in zip(names, scored, answers, strict=True):
        steps = score.prompt_logprobs[1:]  # the first token has none
        ids = score.prompt_token_ids[1:]
        generated = answer.outputs[0]
        margins = []
        for step in generated.logprobs:
            first, second = sorted((p.logprob for p in step.values()), reverse=True)[:2]
            margins.append(first - second)
        report[name] = {"scores": [step[token].logprob for step, token in zip(steps, ids,
                                                                               strict=True)],
                        "text": generated.text, "tokens": list(generated.token_ids),
                        "margins": margins}
    with open(out, "w") as f:
        json.dump(report, f)
