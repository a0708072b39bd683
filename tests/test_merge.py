"""zoo merge / zoo dequantize against independent references: the formula, PEFT, bitsandbytes, vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.bounds import assert_within, fold_bound, gamma
from tests.helpers import zoo, zoo_json
from zoo.catalog.registry import Registry
from zoo.errors import VerificationFailed
from zoo.merge import MergeOptions, merge


def weights_of(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def lora_of(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(adapter_dir) / "adapter_model.safetensors")


def expected(base: dict, lora: dict, module: str, scale: float, prefix="base_model.model.",
             transpose=False, weight=1.0) -> torch.Tensor:
    """W + w * s * B @ A, from the raw tensors, in float64 (the independent formula)."""
    a = lora[f"{prefix}{module}.lora_A.weight"].double()
    b = lora[f"{prefix}{module}.lora_B.weight"].double()
    delta = weight * scale * (b @ a)
    return base[f"{module}.weight"].double() + (delta.T if transpose else delta)


def assert_fold(got: torch.Tensor, base: dict, lora: dict, module: str, scale: float,
                transpose=False, weight=1.0) -> None:
    """``got`` is W + w * s * B @ A within the rounding of computing it in float32."""
    a = lora[f"base_model.model.{module}.lora_A.weight"]
    b = lora[f"base_model.model.{module}.lora_B.weight"]
    w = base[f"{module}.weight"]
    bound = fold_bound(w.T if transpose else w, [(weight * scale, b, a)])
    assert_within(got, expected(base, lora, module, scale, transpose=transpose, weight=weight),
                  bound.T if transpose else bound, module)


@pytest.fixture
def tiny(models):
    zoo("add", models.llama, "--name", "tiny")
    return models


def test_lora_weights_match_the_formula(tiny, tmp_path):
    adapter = tiny.lora("plain")
    zoo("add", adapter, "--name", "p", "--base", "tiny")
    zoo("merge", "--adapter", "p", "--out", tmp_path / "m", "--dtype", "fp32")
    merged, base, lora = weights_of(tmp_path / "m"), weights_of(tiny.llama), lora_of(adapter)
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            module = f"model.layers.{layer}.self_attn.{proj}"
            assert_fold(merged[f"{module}.weight"], base, lora, module, 8 / 4)
    # untouched tensors are copied through, as they were (upcast to the output dtype)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                       base["model.layers.0.mlp.up_proj.weight"].float())
    assert set(merged) == set(base)
    index = json.loads((tmp_path / "m/model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)


def test_rslora_and_patterns_use_their_own_scales(tiny, tmp_path):
    rs = tiny.lora("rs", use_rslora=True, r=4, lora_alpha=8)
    pat = tiny.lora("pat", rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 16})
    zoo("add", rs, "--name", "rs", "--base", "tiny")
    zoo("add", pat, "--name", "pat", "--base", "tiny")
    zoo("merge", "--adapter", "rs", "--out", tmp_path / "rs", "--dtype", "fp32")
    zoo("merge", "--adapter", "pat", "--out", tmp_path / "pat", "--dtype", "fp32")
    base = weights_of(tiny.llama)
    module_q, module_v = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    assert_fold(weights_of(tmp_path / "rs")[f"{module_q}.weight"], base, lora_of(rs), module_q,
                8 / 4 ** 0.5)
    merged = weights_of(tmp_path / "pat")
    assert_fold(merged[f"{module_q}.weight"], base, lora_of(pat), module_q, 8 / 4)
    assert_fold(merged[f"{module_v}.weight"], base, lora_of(pat), module_v, 16 / 2)


def test_gpt2_fan_in_fan_out(models, tmp_path):
    zoo("add", models.gpt2, "--name", "g")
    adapter = models.lora("gpt2", base=models.gpt2, target_modules=["c_attn"], fan_in_fan_out=True)
    zoo("add", adapter, "--name", "ga", "--base", "g")
    result = zoo("merge", "--adapter", "ga", "--out", tmp_path / "m", "--dtype", "fp32")
    assert "verified" in result.stdout
    merged, base = weights_of(tmp_path / "m"), weights_of(models.gpt2)
    module = "transformer.h.0.attn.c_attn"
    assert merged[f"{module}.weight"].shape == (32, 96)  # Conv1D: [in, out]
    assert_fold(merged[f"{module}.weight"], base, lora_of(adapter), module, 2.0, transpose=True)


def test_dora_rescales_rows_to_the_magnitude(tiny, tmp_path):
    adapter = tiny.lora("dora", use_dora=True)
    zoo("add", adapter, "--name", "d", "--base", "tiny")
    result = zoo("merge", "--adapter", "d", "--out", tmp_path / "m", "--dtype", "fp32")
    assert "verified" in result.stdout  # logits match PEFT's own DoRA forward
    lora, base = lora_of(adapter), weights_of(tiny.llama)
    module = "model.layers.0.self_attn.q_proj"
    combined = expected(base, lora, module, 2.0)
    magnitude = lora[f"base_model.model.{module}.lora_magnitude_vector"].double()
    want = combined * (magnitude / combined.norm(dim=1)).view(-1, 1)
    got = weights_of(tmp_path / "m")[f"{module}.weight"]
    # the fold's error (relative to each row's size), the row norm's (a sum of d squares)
    # and the rescaling's rounding, all relative to the rescaled row
    a, b = (lora[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
    fold = fold_bound(base[f"{module}.weight"], [(2.0, b, a)])
    relative = (fold.norm(dim=1) / combined.norm(dim=1)).view(-1, 1)
    bound = (2 * relative + gamma(combined.shape[1] + 3)) * want.abs().amax(dim=1, keepdim=True)
    assert_within(got, want, bound, module)
    assert_within(got.norm(dim=1), magnitude, bound.view(-1) * combined.shape[1] ** 0.5 +
                  gamma(combined.shape[1] + 1) * magnitude, "row norms")


def test_embedding_lora_folds_into_the_table(tiny, tmp_path):
    adapter = tiny.lora("emb", target_modules=["embed_tokens", "q_proj"])
    zoo("add", adapter, "--name", "e", "--base", "tiny")
    result = zoo("merge", "--adapter", "e", "--out", tmp_path / "m", "--dtype", "fp32")
    assert "verified" in result.stdout
    lora, base = lora_of(adapter), weights_of(tiny.llama)
    a = lora["base_model.model.model.embed_tokens.lora_embedding_A"]  # [r, vocab]
    b = lora["base_model.model.model.embed_tokens.lora_embedding_B"]  # [dim, r]
    want = base["model.embed_tokens.weight"].double() + 2.0 * (b.double() @ a.double()).T
    bound = fold_bound(base["model.embed_tokens.weight"].T, [(2.0, b, a)]).T
    assert_within(weights_of(tmp_path / "m")["model.embed_tokens.weight"], want, bound)


def test_embedding_lora_on_a_tied_base_unties_the_head(models, tmp_path):
    """The adapter changes the input table only, so the head keeps the original weights."""
    zoo("add", models.gpt2, "--name", "g")
    adapter = models.lora("gpt2-wte", base=models.gpt2, target_modules=["wte", "c_attn"],
                          fan_in_fan_out=True)
    zoo("add", adapter, "--name", "gw", "--base", "g")
    result = zoo("merge", "--adapter", "gw", "--out", tmp_path / "m", "--dtype", "fp32")
    assert "verified" in result.stdout  # logits match PEFT's unmerged forward
    merged, base = weights_of(tmp_path / "m"), weights_of(models.gpt2)
    assert "lm_head.weight" not in base
    assert torch.equal(merged["lm_head.weight"], base["transformer.wte.weight"])
    assert not torch.equal(merged["transformer.wte.weight"], base["transformer.wte.weight"])
    assert json.loads((tmp_path / "m/config.json").read_text())["tie_word_embeddings"] is False


def test_two_adapters_combine_as_a_weighted_sum(tiny, tmp_path):
    a, b = tiny.lora("plain"), tiny.lora("second", r=2, lora_alpha=4, seed=9)
    zoo("add", a, "--name", "a", "--base", "tiny")
    zoo("add", b, "--name", "b", "--base", "tiny")
    result = zoo("merge", "--adapter", "a", "--adapter", "b", "--weights", "0.7,0.3",
                 "--name", "ab", "--dtype", "fp32")
    assert "verified" in result.stdout
    entry = zoo_json("show", "ab")
    assert entry["kind"] == "merged" and entry["base"] == "tiny"
    assert [x["weight"] for x in entry["source"]["adapters"]] == [0.7, 0.3]
    merged, base = weights_of(Path(entry["path"])), weights_of(tiny.llama)
    module = "model.layers.1.self_attn.v_proj"
    want = expected(base, lora_of(a), module, 2.0, weight=0.7) + \
        expected(base, lora_of(b), module, 2.0, weight=0.3) - base[f"{module}.weight"].double()
    terms = [(w * 2.0, lora[f"base_model.model.{module}.lora_B.weight"],
              lora[f"base_model.model.{module}.lora_A.weight"])
             for w, lora in ((0.7, lora_of(a)), (0.3, lora_of(b)))]
    assert_within(merged[f"{module}.weight"], want, fold_bound(base[f"{module}.weight"], terms))


def test_merged_logits_match_peft_unmerged(tiny):
    zoo("add", tiny.lora("plain"), "--name", "p", "--base", "tiny")
    result = merge(MergeOptions(adapters=("p",), name="p-bf16"), Registry())
    v = result.verification
    assert v["modules"] >= 2 and v["worst_vs_rounding_bound"] <= 1 and v["rows"] > 10
    assert v["real_activations"], "the prompts' token embeddings are among the inputs"
    # and independently of zoo's own check: PEFT's forward against the merged model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[5, 17, 30, 44, 60, 71]])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        tiny.llama, dtype=torch.float32), tiny.lora("plain")).eval()
    out = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (ref(input_ids=ids).logits - out(input_ids=ids).logits).abs().max()
    assert float(diff) < 0.05
    card = (result.path / "README.md").read_text()
    assert "base_model: tiny" in card and "| p | lora |" in card


def test_a_wrong_merge_fails_verification(tiny, monkeypatch, tmp_path):
    zoo("add", tiny.lora("plain"), "--name", "p", "--base", "tiny")
    from zoo.merge import lora as lora_math
    real = lora_math.LoraFile.scale
    monkeypatch.setattr(lora_math.LoraFile, "scale", lambda self, m: 3 * real(self, m))
    with pytest.raises(VerificationFailed):
        merge(MergeOptions(adapters=("p",), out=tmp_path / "bad"), Registry())
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["zoo-home"]


@pytest.mark.parametrize("mistake", ["transposed", "other layer", "scale x1.02"])
def test_small_and_structural_mistakes_fail_verification_in_bf16(tiny, monkeypatch, tmp_path,
                                                                  mistake):
    """The module check runs in float64 against PEFT: a wrong delta fails even when the output
    dtype's rounding is far larger than the mistake."""
    zoo("add", tiny.lora("plain"), "--name", "p", "--base", "tiny")
    from zoo.merge import lora as lora_math
    real_factors, real_modules = lora_math.LoraFile.factors, lora_math.LoraFile.modules
    real_scale = lora_math.LoraFile.scale
    if mistake == "transposed":  # q_proj is square on the tiny llama: (B A)ᵀ = Aᵀ Bᵀ
        def transposed(self, module, weighted=True):
            left, right = real_factors(self, module, weighted)
            return (right.T.contiguous(), left.T.contiguous()) if module.endswith("q_proj") \
                else (left, right)
        monkeypatch.setattr(lora_math.LoraFile, "factors", transposed)
    elif mistake == "other layer":
        def swapped(self):
            found = dict(real_modules(self))
            a, b = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
            found[a], found[b] = found[b], found[a]
            return found
        monkeypatch.setattr(lora_math.LoraFile, "modules", swapped)
    else:
        monkeypatch.setattr(lora_math.LoraFile, "scale", lambda self, m: real_scale(self, m) * 1.02)
    with pytest.raises(VerificationFailed, match="PEFT's LoRA layer"):
        merge(MergeOptions(adapters=("p",), out=tmp_path / "bad", dtype="bf16"), Registry())
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_large_valid_adapter_is_not_refused_in_16_bits(tiny, tmp_path, dtype):
    """The case the old logit tolerance refused: rsLoRA on all seven projections with rank and
    alpha patterns, moving the logits a lot. Both checks pass; the end-to-end one is asked for."""
    adapter = tiny.lora("full", use_rslora=True, r=8, lora_alpha=16,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"],
                        rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 32})
    zoo("add", adapter, "--name", "full", "--base", "tiny")
    result = merge(MergeOptions(adapters=("full",), out=tmp_path / dtype, dtype=dtype,
                                verify="full"), Registry())
    v = result.verification
    assert v["mode"] == "full" and v["max_abs_diff"] <= v["tolerance"]
    assert v["modules"]["modules"] == 14 and v["modules"]["worst_vs_rounding_bound"] <= 1
    old_rule = {"bf16": 1e-2, "fp16": 2e-3}[dtype] * max(v["max_abs_logit"], 1.0)
    assert v["max_abs_diff"] > old_rule  # the fixed relative tolerance refused this merge


@pytest.fixture
def qlora(models):
    zoo("add", models.llama_blocks, "--name", "tiny")
    zoo("quantize", "tiny", "--scheme", "nf4", "--no-eval")
    adapter = models.lora("blocks", base=models.llama_blocks)
    zoo("add", adapter, "--name", "q", "--base", "tiny@nf4")
    return adapter


def _bnb_dequantized(nf4_dir: Path) -> dict[str, torch.Tensor]:
    """bitsandbytes' own dequantization of every 4-bit weight of a saved NF4 model."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(nf4_dir, device_map="cpu")
    return {f"{name}.weight": F.dequantize_4bit(m.weight.data, m.weight.quant_state)
            for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def test_nf4_dequantization_is_bit_exact(qlora, tmp_path):
    zoo("dequantize", "tiny@nf4", "--out", tmp_path / "dq")
    nf4_dir = Path(zoo_json("show", "tiny")["variants"]["nf4"]["path"])
    reference = _bnb_dequantized(nf4_dir)
    ours = weights_of(tmp_path / "dq")
    assert len(reference) == 2 * 7
    for name, value in reference.items():
        assert ours[name].dtype == value.dtype == torch.bfloat16
        assert torch.equal(ours[name].view(torch.int16), value.view(torch.int16)), name
    config = json.loads((tmp_path / "dq/config.json").read_text())
    assert "quantization_config" not in config


def test_qlora_folds_into_the_dequantized_base_by_default(models, qlora, tmp_path):
    result = zoo("merge", "--adapter", "q", "--out", tmp_path / "dq", "--dtype", "fp32")
    assert "verified" in result.stdout  # against PEFT on the NF4 base itself
    zoo("merge", "--adapter", "q", "--out", tmp_path / "orig", "--dtype", "fp32",
        "--qlora-base", "original")
    nf4_dir = Path(zoo_json("show", "tiny")["variants"]["nf4"]["path"])
    dequantized = {k: v.float() for k, v in _bnb_dequantized(nf4_dir).items()}
    original, lora = weights_of(models.llama_blocks), lora_of(qlora)
    module = "model.layers.0.self_attn.q_proj"
    assert_fold(weights_of(tmp_path / "dq")[f"{module}.weight"], dequantized, lora, module, 2.0)
    assert_fold(weights_of(tmp_path / "orig")[f"{module}.weight"], original, lora, module, 2.0)
    # untouched NF4 weights come back dequantized, never re-quantized
    torch.testing.assert_close(weights_of(tmp_path / "dq")["model.layers.0.mlp.up_proj.weight"],
                               dequantized["model.layers.0.mlp.up_proj.weight"], atol=0, rtol=0)


def test_refusals_write_nothing(tiny, tmp_path, zoo_home):
    zoo("add", tiny.bottleneck(), "--name", "bn", "--base", "tiny")
    result = zoo("merge", "--adapter", "bn", "--out", tmp_path / "x", ok=False)
    assert result.exit_code == 1 and "cannot be folded" in result.stderr
    assert "zoo generate --adapter bn" in result.stderr

    zoo("add", tiny.llama_wide, "--name", "wide")
    zoo("add", tiny.lora("plain"), "--name", "p", "--base", "tiny")
    zoo("add", tiny.lora("wide", base=tiny.llama_wide), "--name", "w", "--base", "wide")
    result = zoo("merge", "--adapter", "p", "--adapter", "w", "--name", "pw", ok=False)
    assert "different bases" in result.stderr

    for weight in ("nan", "inf"):  # were merged, then failed verification as a bug to report
        result = zoo("merge", "--adapter", "p", "--weights", weight, "--out", tmp_path / "n",
                     ok=False)
        assert result.exit_code == 1 and "finite" in result.stderr
    result = zoo("merge", "--adapter", "p", "--weights", "0", "--out", tmp_path / "z", ok=False)
    assert result.exit_code == 1 and "every weight is 0" in result.stderr  # merged the base

    (tmp_path / "exists").mkdir()
    result = zoo("merge", "--adapter", "p", "--out", tmp_path / "exists", ok=False)
    assert "already exists" in result.stderr and "--force" in result.stderr

    stored = zoo_home / "adapters/p/adapter_model.safetensors"
    stored.write_bytes(stored.read_bytes()[:-8] + bytes(8))
    result = zoo("merge", "--adapter", "p", "--out", tmp_path / "y", ok=False)
    assert "files changed" in result.stderr and "adapter_model.safetensors" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "zoo-home"]
    assert list((tmp_path / "exists").iterdir()) == []


def test_interrupted_merge_leaves_no_partial_output(tiny, tmp_path, monkeypatch):
    zoo("add", tiny.lora("plain"), "--name", "p", "--base", "tiny")
    from zoo.merge import tensors

    def interrupted(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(tensors, "check_written", interrupted)
    result = zoo("merge", "--adapter", "p", "--out", tmp_path / "out", ok=False)
    assert result.exit_code == 130
    assert [p.name for p in tmp_path.iterdir()] == ["zoo-home"]


def test_force_replaces_an_existing_output(tiny, tmp_path):
    zoo("add", tiny.lora("plain"), "--name", "p", "--base", "tiny")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    zoo("merge", "--adapter", "p", "--out", tmp_path / "out", "--force")
    assert not (tmp_path / "out" / "old.txt").exists()
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()



def test_force_keeps_the_old_registered_model_until_the_new_one_is_committed(
        tiny, tmp_path, zoo_home, monkeypatch):
    zoo("add", tiny.lora("plain"), "--name", "p", "--base", "tiny")
    zoo("merge", "--adapter", "p", "--name", "pm")
    old = zoo_json("show", "pm")
    from zoo.merge import lora as lora_math

    real = lora_math.LoraFile.scale
    with monkeypatch.context() as m:  # the new model fails verification
        m.setattr(lora_math.LoraFile, "scale", lambda self, mod: 3 * real(self, mod))
        assert zoo("merge", "--adapter", "p", "--name", "pm", "--force", ok=False).exit_code == 1
    assert zoo_json("show", "pm") == old and zoo("verify", "pm").exit_code == 0

    import zoo.catalog.registry as registry_module

    real_write = registry_module.write_bytes_atomic

    def registry_write_fails(path, payload):  # any write that records pm fails
        if "pm" in json.loads(payload)["entries"]:
            raise OSError("disk full")
        real_write(path, payload)

    with monkeypatch.context() as m:  # the new model is complete, the registry write fails
        m.setattr(registry_module, "write_bytes_atomic", registry_write_fails)
        assert zoo("merge", "--adapter", "p", "--name", "pm", "--force", ok=False).exit_code == 2
    assert zoo_json("show", "pm") == old and zoo("verify", "pm").exit_code == 0
    assert not list((zoo_home / "tmp").iterdir())

    zoo("merge", "--adapter", "p", "--name", "pm", "--force", "--dtype", "fp32")
    new = zoo_json("show", "pm")
    assert new["dtype"] == "float32" and new["content_hash"] != old["content_hash"]
    assert zoo("verify").exit_code == 0
    zoo("add", tiny.lora("plain"), "--name", "on-pm", "--base", "pm")
    result = zoo("merge", "--adapter", "p", "--name", "pm", "--force", ok=False)
    assert "adapters belong to it: on-pm" in result.stderr

def test_shards_roll_at_the_size_limit(tiny, tmp_path):
    zoo("add", tiny.lora("plain"), "--name", "p", "--base", "tiny")
    merge(MergeOptions(adapters=("p",), out=tmp_path / "m", max_shard_bytes=10_000), Registry())
    shards = sorted((tmp_path / "m").glob("*.safetensors"))
    assert len(shards) > 3 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    largest = 128 * 32 * 2  # the embedding, in bf16
    assert all(s.stat().st_size < 10_000 + largest + 4096 for s in shards)
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").num_parameters() > 0


PEAK_PROBE = """
import sys
from pathlib import Path
from zoo.core.measure import peak_rss_bytes
from zoo.merge import MergeOptions, merge
from zoo.catalog.registry import Registry
import torch, transformers, peft  # what a merge imports, before measuring the baseline
baseline = peak_rss_bytes()
if sys.argv[1] != "-":
    merge(MergeOptions(adapters=(sys.argv[1],), out=Path(sys.argv[2])), Registry())  # verified
print(baseline, peak_rss_bytes())
"""
TENSOR = (4096, 2048)  # 32 MB in float32


def big_model(root: Path, layers: int) -> str:
    """A float32 Llama-shaped checkpoint of LAYERS 32 MB tensors and a rank-8 LoRA on each."""
    from safetensors.torch import save_file

    base, lora = root / f"big{layers}", root / f"big{layers}-lora"
    base.mkdir()
    lora.mkdir()
    for i in range(layers):  # one file per tensor keeps this test's own memory small
        save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(*TENSOR)},
                  base / f"model-{i:05d}-of-{layers:05d}.safetensors")
    weight_map = {f"model.layers.{i}.mlp.up_proj.weight": f"model-{i:05d}-of-{layers:05d}.safetensors"
                  for i in range(layers)}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                   "weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": TENSOR[1],
        "num_hidden_layers": layers, "vocab_size": 10, "dtype": "float32"}))
    save_file({f"base_model.model.model.layers.{i}.mlp.up_proj.lora_{m}.weight":
               torch.randn(*((8, TENSOR[1]) if m == "A" else (TENSOR[0], 8))) for i in range(layers)
               for m in "AB"}, lora / "adapter_model.safetensors")
    (lora / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["up_proj"]}))
    zoo("add", base, "--name", base.name)
    zoo("add", lora, "--name", lora.name, "--base", base.name)
    return lora.name


def merge_peak(adapter: str, out: Path) -> tuple[int, int]:
    """(peak RSS after the imports a merge needs, peak RSS after merging ADAPTER) of a fresh process."""
    # A fixed mmap threshold keeps glibc from caching freed 32 MB blocks in the heap (its
    # dynamic threshold otherwise grows to exactly that size), so RSS follows what zoo holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE, adapter, str(out)],
                            capture_output=True, text=True, check=True, env=env)
    before, after = map(int, result.stdout.split()[-2:])
    return before, after


def test_merge_memory_does_not_grow_with_the_model(tmp_path, zoo_home):
    """Merging and verifying stream tensor by tensor: a 4x larger model takes no more extra
    memory, and the extra stays a few tensors, far below the model's size."""
    tensor_bytes = TENSOR[0] * TENSOR[1] * 4
    floor = max(merge_peak("-", tmp_path / "unused"))
    extra = {}
    for layers in (4, 16):
        before, after = merge_peak(big_model(tmp_path, layers), tmp_path / f"out{layers}")
        extra[layers] = after - max(before, floor)
    assert extra[16] - extra[4] < tensor_bytes, {k: v / 1e6 for k, v in extra.items()}
    assert extra[16] < 16 * tensor_bytes / 3, {k: v / 1e6 for k, v in extra.items()}


def test_tensor_files_read_rows_blocks_and_pieces_like_safetensors(tmp_path):
    """zoo's streaming reader against safetensors' own: rows, blocks of rows and byte pieces
    (read into one reused buffer) of every dtype and shape, scalars and empty tensors too."""
    from safetensors.torch import save_file

    from zoo.merge.tensors import TensorFile

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(37, 5, 3, generator=g).to(torch.bfloat16),
               "v": torch.randn(11, generator=g), "i": torch.arange(9, dtype=torch.int64),
               "s": torch.tensor(2.5, dtype=torch.float16), "e": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors")
    reference, f = load_file(tmp_path / "t.safetensors"), TensorFile(tmp_path / "t.safetensors")
    for name, want in reference.items():
        assert torch.equal(f.get(name), want), name
        assert b"".join(bytes(piece) for piece in f.raw(name, chunk=7)) == \
            want.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), name
        blocks = list(f.row_blocks(name, max_bytes=40))
        if want.dim() == 0:
            assert [b.item() for b in blocks] == [want.item()]
        elif len(want) == 0:
            assert blocks == [], name
        else:
            assert torch.equal(torch.cat(blocks), want), name
        if want.dim() and len(want) > 3:
            assert torch.equal(f.rows(name, 2, len(want) - 1), want[2:-1]), name
            assert len(blocks) > 1, name


@pytest.fixture(scope="module")
def bf16_server(smollm2_home, tmp_path_factory, engine_reports):
    """vLLM serving the 16-bit real base (float32 compute, to compare with transformers
    in float32) and a LoRA trained on it."""
    import urllib.request

    from tests.conftest import linked_home
    from zoo.serve.launch import ServeOptions, free_port, running_server
    from zoo.train import PACKAGE_DATA, TrainOptions, train

    home = linked_home(smollm2_home, tmp_path_factory.mktemp("bf16") / "home")
    registry = Registry(home)
    train(TrainOptions(base="smollm2-135m-instruct", method="lora", name="fr", steps=10,
                       lr=2e-3, data=PACKAGE_DATA / "french.jsonl"), registry, progress=False)
    options = ServeOptions(base="smollm2-135m-instruct", quantization="none", port=free_port(),
                           dtype="float32")
    with running_server(options, registry, log_file=home.parent / "vllm-bf16.log") as server:
        report = urllib.request.urlopen(server.url.removesuffix("/v1") + "/zoo/engine").read()
        engine_reports["bf16"] = json.loads(report)
        yield server, registry


@pytest.mark.vllm
def test_merged_model_answers_like_vllm_with_the_adapter(bf16_server):
    """The merged model (transformers) scores a text as vLLM serving the adapter on the base
    does: nearer to it than half the distance between the base and the adapter."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import SCORED_TEXT, distance, served_scores, transformers_scores
    from zoo.catalog.loading import load_tokenizer

    server, registry = bf16_server
    result = merge(MergeOptions(adapters=("fr",), name="fr-merged", dtype="fp32"), registry)
    tokenizer = load_tokenizer(result.path)
    model = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    ids = tokenizer(SCORED_TEXT)["input_ids"]
    merged = transformers_scores(model, ids)
    served = served_scores(server.url, "fr", ids)
    base = served_scores(server.url, "smollm2-135m-instruct", ids)
    noise, separation = distance(merged, served), distance(served, base)
    assert noise < separation / 2, (noise, separation)


@pytest.mark.vllm
def test_algebra_results_are_served_like_their_source(bf16_server):
    """An adapter re-factored by compress (at its own rank) and one extracted from its fp32
    merge are hot-added and served by vLLM scoring a text as the original does: nearer to
    it than half the distance between the original and the base."""
    from tests.helpers import SCORED_TEXT, distance, served_scores
    from zoo.merge.algebra import compress, extract

    server, registry = bf16_server
    rank = registry.load().adapter("fr").rank
    compress("fr", rank, "fr-refactored", registry, logits=False)
    merge(MergeOptions(adapters=("fr",), name="fr-fp32", dtype="fp32", verify="none"), registry)
    extract("fr-fp32", "smollm2-135m-instruct", rank, "fr-extracted", registry, logits=False)
    scores = {name: served_scores(server.url, name, SCORED_TEXT)
              for name in ("fr", "fr-refactored", "fr-extracted", "smollm2-135m-instruct")}
    separation = distance(scores["fr"], scores["smollm2-135m-instruct"])
    for name in ("fr-refactored", "fr-extracted"):
        assert distance(scores[name], scores["fr"]) < separation / 2, (name, separation)


def test_a_merge_hashes_each_stored_file_at_most_once(tiny, tmp_path, monkeypatch):
    from collections import Counter

    from zoo.catalog import integrity

    zoo("add", tiny.lora("plain"), "--name", "p", "--base", "tiny")
    integrity.forget_hashes()  # as at the start of a command on a new machine
    hashed: Counter = Counter()
    real = integrity.sha256_file

    def counting(path):
        hashed[str(path)] += 1
        return real(path)

    monkeypatch.setattr(integrity, "sha256_file", counting)
    zoo("merge", "--adapter", "p", "--name", "pm")
    base_files = [p for p in hashed if "/bases/tiny/" in p]
    assert base_files and all(hashed[p] == 1 for p in hashed), hashed
