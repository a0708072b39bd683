"""Adapter algebra against independent references: PEFT's add_weighted_adapter and
merge_and_unload, the update's own dense SVD (Eckart-Young), the LoRA paper's formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.bounds import assert_within, forward_bound, gamma, truncation_bound
from tests.helpers import zoo, zoo_json
from zoo.catalog.registry import Registry
from zoo.errors import ZooError
from zoo.merge.algebra import CombineOptions, combine, compress, extract, similarity

PREFIX = "base_model.model."


@pytest.fixture
def two(models):
    """The tiny llama and two adapters of different ranks and scales (rsLoRA, patterns)."""
    zoo("add", models.llama, "--name", "tiny")
    a = models.lora("alg-a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    b = models.lora("alg-b", seed=7, r=6, lora_alpha=6, use_rslora=True,
                    target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    zoo("add", a, "--name", "a", "--base", "tiny")
    zoo("add", b, "--name", "b", "--base", "tiny")
    return models, a, b


def updates(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """module -> (alpha / r) * B @ A, from the raw file and config (no rsLoRA or patterns:
    algebra writes alpha = r; callers rescale other adapters)."""
    import json
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            out[module] = scale * b.float() @ a.float()
    return out


def peft_combined(models, adapters, weights, combination, **kwargs) -> dict[str, torch.Tensor]:
    """PEFT's own add_weighted_adapter, as module -> update of the new adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models.llama, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, adapters[0], adapter_name="x0")
    for i, path in enumerate(adapters[1:], start=1):
        peft.load_adapter(path, adapter_name=f"x{i}")
    peft.add_weighted_adapter([f"x{i}" for i in range(len(adapters))], list(weights), "combo",
                              combination_type=combination, **kwargs)
    found = {}
    for name, module in peft.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "combo" in module.lora_A:
            found[name] = module.get_delta_weight("combo").float()
    return found


# energy kept is a ratio of sums of squared singular values: float32 rounding of a few
# dozen terms
EXACT_ENERGY = gamma(64)


def logit_bound(result, widest: int = 64 + 16) -> float:
    """How far two float32 forwards of the tiny llama (2 layers, widest reduction 64 plus
    the factors' rank) may differ when their weights agree up to rounding."""
    return forward_bound(result.logits["max_abs_logit"], widest, layers=2)


def assert_same_updates(got: dict, want: dict) -> None:
    """Each module's update equal within the rounding of refactoring it in float32 (an
    SVD of a [out, in] update: its reduction is out + in long)."""
    assert set(got) == set(want)
    for module in want:
        bound = gamma(sum(want[module].shape) + 16) * float(want[module].norm())
        assert float((got[module] - want[module]).norm()) <= 4 * bound, module


def test_linear_is_the_exact_weighted_sum_and_matches_peft_cat(two, zoo_home):
    models, a, b = two
    result = combine(CombineOptions(adapters=("a", "b"), name="ab", weights=(0.7, 0.3)))
    assert result.rank == 10 and abs(result.energy_kept - 1.0) <= EXACT_ENERGY
    assert result.entry.servable and result.entry.kind == "lora"
    assert result.logits["max_abs_diff"] <= logit_bound(result)  # PEFT, both adapters on
    got = updates(Path(zoo_json("show", "ab")["path"]))
    # the formula from the raw files: 0.7 * s_a B_a A_a + 0.3 * s_b B_b A_b
    ua, ub = updates(a), updates(b)  # b's file says alpha / r = 1; it is rsLoRA with patterns:
    ub = {m: u * (6 / 2 ** 0.5 if m.endswith("v_proj") else 6 / 6 ** 0.5) for m, u in ub.items()}
    want = {m: 0.7 * ua.get(m, 0) + 0.3 * ub.get(m, 0) for m in set(ua) | set(ub)}
    assert_same_updates(got, want)
    assert_same_updates(got, peft_combined(models, [a, b], (0.7, 0.3), "cat"))


def test_svd_at_a_lower_rank_matches_peft(two, zoo_home):
    models, a, b = two
    result = combine(CombineOptions(adapters=("a", "b"), name="ab4", method="svd", rank=4,
                                    logits=False))
    assert result.rank == 4 and result.energy_kept < 1.0
    got = updates(Path(zoo_json("show", "ab4")["path"]))
    assert_same_updates(got, peft_combined(models, [a, b], (1.0, 1.0), "svd", svd_rank=4))


def test_ties_matches_peft(two, zoo_home):
    models, a, b = two
    combine(CombineOptions(adapters=("a", "b"), name="t", method="ties", density=0.4,
                           weights=(1.0, 0.5), rank=8, logits=False))
    got = updates(Path(zoo_json("show", "t")["path"]))
    assert_same_updates(got, peft_combined(models, [a, b], (1.0, 0.5), "ties_svd",
                                           svd_rank=8, density=0.4))


def test_dare_matches_peft_on_the_same_seed(two, zoo_home, monkeypatch):
    models, a, b = two
    combine(CombineOptions(adapters=("a", "b"), name="d", method="dare_linear", density=0.5,
                           rank=8, seed=3, logits=False))
    got = updates(Path(zoo_json("show", "d")["path"]))
    # PEFT first draws the new adapter's initial weights from the same generator; seed it
    # again where its merge loop starts, as zoo seeds it where its own starts.
    import peft.tuners.lora.model as lora_model
    freeze = lora_model._freeze_adapter

    def reseeded(*args):
        freeze(*args)
        torch.manual_seed(3)
    monkeypatch.setattr(lora_model, "_freeze_adapter", reseeded)
    want = peft_combined(models, [a, b], (1.0, 1.0), "dare_linear_svd", svd_rank=8, density=0.5)
    assert_same_updates(got, want)
    combine(CombineOptions(adapters=("a", "b"), name="d2", method="dare_linear", density=0.5,
                           rank=8, seed=4, logits=False))
    other = updates(Path(zoo_json("show", "d2")["path"]))
    assert any(not torch.allclose(other[m], got[m]) for m in got)  # the seed matters


def test_compress_is_the_truncated_svd_of_the_update(two, zoo_home):
    _models, a, _b = two
    exact = compress("a", 4)
    assert abs(exact.energy_kept - 1.0) <= EXACT_ENERGY
    assert exact.logits["max_abs_diff"] <= logit_bound(exact)
    small = compress("a", 2, "a-small")
    got = updates(Path(zoo_json("show", "a-small")["path"]))
    kept = total = moved = 0.0
    for module, update in updates(a).items():
        update = update.double()
        u, s, vh = torch.linalg.svd(update)  # Eckart-Young: the best rank-2 approximation
        bound = truncation_bound(update, 2, extra=4)
        assert_within(got[module], (u[:, :2] * s[:2]) @ vh[:2], bound, module)
        kept, total = kept + float(s[:2].pow(2).sum()), total + float(s.pow(2).sum())
        moved += 2 * float(s.sum()) * gamma(sum(update.shape) + 4) * float(s[0])  # Weyl
    assert abs(small.energy_kept - kept / total) <= moved / total + gamma(len(got))
    assert small.logits["max_abs_diff"] > exact.logits["max_abs_diff"]
    out = zoo("compress", "a", "--rank", "3")
    assert "registered a-r3" in out.stdout and "energy kept" in out.stdout


def test_a_rank_past_what_the_updates_hold_is_written_at_theirs(two, zoo_home):
    """Before, compress to rank 100,000 of a rank-4 adapter wrote 90 MB of zeros beside
    the update (83,632% of the tiny base). Past the updates' own rank, the result is
    exact at theirs: the adapter's own (4), a sum's (4 + 6), the smaller side (32)."""
    models, a, _b = two
    lines = []
    result = compress("a", 100_000, "a-big", log=lines.append)
    assert result.rank == 4 and zoo_json("show", "a-big")["rank"] == 4
    assert abs(result.energy_kept - 1.0) <= EXACT_ENERGY
    assert any("written at rank 4, exactly" in line for line in lines)
    for module, update in updates(Path(zoo_json("show", "a-big")["path"])).items():
        assert_within(update, updates(a)[module], truncation_bound(update, 4, extra=4), module)
    combined = combine(CombineOptions(("a", "b"), "ab", rank=50))
    assert combined.rank == 4 + 6 and abs(combined.energy_kept - 1.0) <= EXACT_ENERGY
    zoo("merge", "--adapter", "a", "--out", models.root / "merged-a", "--dtype", "fp32")
    extracted = extract(str(models.root / "merged-a"), "tiny", 1000, "ex", logits=False)
    assert extracted.rank <= 32  # the tiny llama's smaller side


def test_compress_folds_dora_into_a_servable_lora(models, zoo_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    zoo("add", models.llama, "--name", "tiny")
    adapter = models.lora("alg-dora", use_dora=True)
    zoo("add", adapter, "--name", "dora", "--base", "tiny")
    assert not zoo_json("show", "dora")["servable"]
    result = compress("dora", 32, "plain")  # full rank of the 32-wide tiny llama: exact
    shown = zoo_json("show", "plain")
    assert shown["servable"] and not shown["lora"]["use_dora"]
    assert result.logits["max_abs_diff"] <= logit_bound(result, widest=32 + 64)  # DoRA norms
    base = AutoModelForCausalLM.from_pretrained(models.llama, dtype=torch.float32)
    original = {n: p.detach().clone() for n, p in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    got = updates(Path(shown["path"]))
    for module, update in got.items():
        want = merged[f"{module}.weight"] - original[f"{module}.weight"]
        # PEFT's merge (a row norm of d terms, a rescale) and zoo's full-rank SVD of the
        # update, each at most gamma of its reduction relative to what it computes
        weight = merged[f"{module}.weight"].abs() + original[f"{module}.weight"].abs()
        bound = gamma(2 * sum(want.shape)) * weight + \
            gamma(sum(want.shape) + 32) * float(torch.linalg.matrix_norm(want.double(), 2))
        assert_within(update, want, bound, module)


def test_extract_recovers_an_adapter_from_its_merged_model(two, zoo_home, tmp_path):
    _models, a, _b = two
    zoo("merge", "--adapter", "a", "--name", "a-full", "--dtype", "fp32")
    result = extract("a-full", "tiny", 4, "a-back")
    assert abs(result.energy_kept - 1.0) <= EXACT_ENERGY
    assert result.logits["max_abs_diff"] <= logit_bound(result)
    got = updates(Path(zoo_json("show", "a-back")["path"]))
    assert_same_updates(got, updates(a))
    lower = extract(str(Path(zoo_json("show", "a-full")["path"])), "tiny", 1, "a-r1")
    assert lower.energy_kept < 1.0


def test_similarity_is_the_lora_papers_phi(two, zoo_home, tmp_path):
    _models, a, b = two
    same = similarity("a", "a")
    for phi in same.modules.values():
        assert_within(phi.diagonal(), torch.ones(4), gamma(32 + 4) * 4)  # QR and SVD of 32-wide
    found = similarity("a", "b")
    assert found.ranks == (4, 2)
    # the formula, from dense SVDs of the updates
    ua, ub = updates(a), updates(b)
    module = "model.layers.1.self_attn.q_proj"
    va = torch.linalg.svd(ua[module])[2][:4]
    vb = torch.linalg.svd(ub[module])[2][:2]
    for i in range(1, 5):
        for j in range(1, 3):
            phi = float((va[:i] @ vb[:j].T).norm() ** 2 / min(i, j))
            bound = truncation_bound(ua[module], i) + truncation_bound(ub[module], j)
            assert abs(found.modules[module][i - 1, j - 1] - phi) <= 2 * bound
    out = zoo("similarity", "a", "b", "--plot", tmp_path / "s.png")
    assert "phi(1,1)" in out.stdout and module in out.stdout
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_algebra_refusals_register_nothing(two, models, zoo_home):
    zoo("add", models.bottleneck(), "--name", "neck", "--base", "tiny")
    before = zoo_json("list")
    for call in (lambda: combine(CombineOptions(adapters=("a", "neck"), name="x")),
                 lambda: combine(CombineOptions(adapters=("a", "b"), name="a")),
                 lambda: combine(CombineOptions(adapters=("a", "b"), name="x", rank=0)),
                 lambda: combine(CombineOptions(adapters=("a", "b"), name="x", method="ties",
                                                density=1.5)),
                 lambda: compress("a", 2, "b"),
                 lambda: extract("tiny", "tiny", 2, "x")):
        with pytest.raises(ZooError):
            call()
    assert zoo_json("list") == before
    assert zoo("verify").exit_code == 0
    result = zoo("merge", "--adapter", "a", "--to-adapter", "x", "--out", "/tmp/x", ok=False)
    assert result.exit_code == 2 and "--to-adapter" in result.output
    assert set(Registry().load().entries) == {e["name"] for e in before}
