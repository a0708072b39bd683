"""zoo eval against transformers' own loss, and the calibrated W8A8 writer's choices."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import zoo, zoo_json
from zoo.apps.evaluate import evaluate, nll_transformers, sequences
from zoo.catalog.registry import Registry

TEXT = ("The lighthouse keeper climbed the stairs every evening. " * 6).strip()


@pytest.fixture
def tiny(models):
    zoo("add", models.llama, "--name", "tiny")
    return models


def hf_loss(model, ids, labels) -> float:
    """transformers' own mean cross-entropy (it shifts the labels itself)."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss)


def test_text_and_chat_losses_match_transformers(tiny, tmp_path, zoo_home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny.llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny.llama)
    text = tmp_path / "held.txt"
    text.write_text(TEXT)
    chat = tmp_path / "held.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]})
        for w in ("yes", "no", "maybe")))
    for data in (text, chat):
        seqs = sequences(tokenizer, data)
        total, count = nll_transformers(model, seqs)
        expected = [(hf_loss(model, ids, labels), sum(label >= 0 for label in labels[1:]))
                    for ids, labels in seqs]
        reference = sum(loss * n for loss, n in expected) / sum(n for _, n in expected)
        assert math.isclose(total / count, reference, rel_tol=1e-5)
        assert count == sum(n for _, n in expected)
    assert count < len(sum((ids for ids, _ in seqs), []))  # only the answers were scored


def test_eval_of_an_adapter_on_another_variant_is_recorded(tiny, tmp_path, zoo_home):
    zoo("quantize", "tiny", "--scheme", "nf4", "--no-eval")
    zoo("add", tiny.lora("plain"), "--name", "acme/q", "--base", "tiny@nf4")
    text = tmp_path / "held.txt"
    text.write_text(TEXT)
    trained = zoo("eval", "acme/q", "--data", text)
    assert "acme/q on nf4: loss" in trained.stdout and "(transformers)" in trained.stdout
    other = json.loads(zoo("eval", "acme/q", "--variant", "nf4", "--data", text, "--json").stdout)
    assert other["variant"] == "nf4" and other["tokens"] > 10
    assert math.isclose(other["perplexity"], math.exp(other["loss"]), rel_tol=1e-3)
    shown = zoo_json("show", "acme/q")["evaluations"]
    assert set(shown) == {"nf4"} and shown["nf4"]["data"] == "held.txt"
    result = zoo("eval", "acme/q", "--variant", "w8a8", "--data", text, ok=False)
    assert result.exit_code == 1 and "base variant" in result.stderr  # tiny has no w8a8


@pytest.mark.slow
def test_calibrated_w8a8_keeps_the_worst_layers_and_records_why(smollm2_home, tmp_path):
    """The calibrated writer on the real base: smoothing lowers the worst int8 error, the
    layers kept in 16 bits are whole vLLM layers, and the checkpoint says so."""
    from tests.conftest import linked_home
    from zoo.quantize import quantize

    home = linked_home(smollm2_home, tmp_path / "home")
    variant = quantize("smollm2-135m-instruct", "w8a8", Registry(home), force=True)
    q = variant.quantization
    assert q["calibrated"] and q["method"] == "smoothquant"
    assert q["worst_int8_error"] < q["worst_int8_error_before_smoothing"]
    config = json.loads((home / variant.path / "config.json").read_text())["quantization_config"]
    ignored = set(config["ignore"])
    assert "lm_head" in ignored
    for layer in q["kept_16bit"]:
        assert layer.endswith(("qkv", "gate_up", "o_proj", "down_proj"))
        parent, _, leaf = layer.rpartition(".")
        parts = {"qkv": ["q_proj", "k_proj", "v_proj"], "gate_up": ["gate_proj", "up_proj"]}
        assert {f"{parent}.{p}" for p in parts.get(leaf, [leaf])} <= ignored


@pytest.mark.vllm
def test_served_loss_matches_transformers_on_the_real_base(smollm2_home, tmp_path):
    from tests.conftest import linked_home
    from zoo.catalog.loading import load_model, load_tokenizer

    home = linked_home(smollm2_home, tmp_path / "home")
    registry = Registry(home)
    served = evaluate("smollm2-135m-instruct", "original", registry=registry)
    base = registry.load().base("smollm2-135m-instruct")
    model = load_model(registry, base)
    tokenizer = load_tokenizer(home / base.path)
    from zoo.models.data import HELDOUT_TEXT

    total, count = nll_transformers(model, sequences(tokenizer, HELDOUT_TEXT))
    assert served.engine == "vllm" and served.tokens == count
    assert math.isclose(served.loss, total / count, rel_tol=2e-3), (served.loss, total / count)
