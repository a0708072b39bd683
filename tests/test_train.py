"""zoo train: the three methods, the data checks, and what gets registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bounds import reported_loss_bound
from tests.helpers import zoo, zoo_json
from zoo.catalog.registry import Registry
from zoo.train import PACKAGE_DATA, TrainOptions, train

DATA = PACKAGE_DATA / "pirate.jsonl"


@pytest.fixture
def tiny(models):
    zoo("add", models.llama, "--name", "tiny")
    return models


@pytest.mark.parametrize("method", ["lora", "qlora", "bottleneck"])
def test_each_method_lowers_the_loss(tiny, method):
    result = zoo("train", "--base", "tiny", "--method", method, "--data", DATA,
                 "--name", f"t-{method}", "--steps", "12", "--lr", "1e-2", "--eval-split", "0.2")
    assert f"registered t-{method}" in result.stdout
    entry = zoo_json("show", f"t-{method}")
    t = entry["training"]
    assert t["eval_loss"] < t["eval_loss_before"], t
    assert t["train_loss"] < t["train_loss_first"], t
    assert t["steps"] == 12 and t["seed"] == 0
    assert t["data_sha256"] == entry["source"]["data_sha256"]
    assert t["data_sha256"].startswith("sha256:") and t["seconds"] > 0
    assert entry["kind"] == method
    loss, tokens = held_out_loss(tiny, entry)
    assert abs(loss - t["eval_loss"]) <= reported_loss_bound(loss, tokens), (loss, t)


def held_out_loss(tiny, entry) -> tuple[float, int]:
    """The trained adapter's loss on the held-out split, recomputed without zoo's training
    code: PEFT's own loading (or a Houlsby forward written from the formula) and
    transformers' own loss, one example at a time."""
    import random

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import houlsby_forward
    from zoo.catalog.loading import load_model
    from zoo.train import IGNORE, TrainOptions, _split, load_dataset

    registry = Registry()
    tokenizer = AutoTokenizer.from_pretrained(tiny.llama)
    options = TrainOptions(base="tiny", method=entry["kind"], data=DATA, name="x",
                           eval_split=0.2)
    random.seed(0)
    _train, held = _split(load_dataset(DATA), options, tokenizer)
    stored = Path(entry["path"])
    if entry["kind"] == "bottleneck":
        model = houlsby_forward(tiny.llama, stored)
    else:
        base = registry.load().base("tiny")
        plain = AutoModelForCausalLM.from_pretrained(tiny.llama, dtype=torch.float32) \
            if entry["kind"] == "lora" else load_model(registry, base, "nf4")
        model = PeftModel.from_pretrained(plain, stored).eval()
    total = tokens = 0
    with torch.no_grad():
        for ids, labels in held:
            n = sum(label != IGNORE for label in labels[1:])
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            total, tokens = total + float(out.loss) * n, tokens + n
    return total / tokens, tokens


def test_lora_starts_from_the_base(tiny):
    """B is zero and A Gaussian at init, the base frozen: step 0 is the base exactly."""
    from zoo.catalog.loading import load_model
    from zoo.train import _wrap

    registry = Registry()
    base = registry.load().base("tiny")
    model, trainable, _ = _wrap(load_model(registry, base), TrainOptions(
        base="tiny", method="lora", data=DATA, name="x", rank=4), base.hidden_size)
    named = dict(model.named_parameters())
    b = [p for n, p in named.items() if "lora_B" in n]
    a = [p for n, p in named.items() if "lora_A" in n]
    assert b and all(float(p.detach().abs().max()) == 0.0 for p in b)
    assert all(0.0 < float(p.detach().std()) < 1.0 for p in a)
    assert {id(p) for p in trainable} == {id(p) for n, p in named.items() if "lora_" in n}
    assert not any(p.requires_grad for n, p in named.items() if "lora_" not in n)


def test_bottleneck_parameter_count_matches_the_formula(tiny):
    zoo("train", "--base", "tiny", "--method", "bottleneck", "--data", DATA, "--name", "bn",
        "--steps", "1", "--rank", "3")
    entry = zoo_json("show", "bn")
    d, m, layers = 32, 3, 2
    modules = layers * 2  # after attention and after the feed-forward block, every layer
    assert entry["bottleneck"]["modules"] == modules
    assert entry["trainable_params"] == modules * (2 * m * d + d + m)
    from zoo.models.bottleneck import Bottleneck
    assert sum(p.numel() for p in Bottleneck(d, m).parameters()) == 2 * m * d + d + m


def test_bottleneck_default_size_and_near_identity_start(tiny):
    import torch

    from zoo.catalog.loading import load_model
    from zoo.models.bottleneck import new_bottleneck

    registry = Registry()
    model = load_model(registry, registry.load().base("tiny"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = model(input_ids=ids).logits
    adapter = new_bottleneck(model)
    assert adapter.config["bottleneck_size"] == 32 // 16
    adapter.attach(model)
    after = model(input_ids=ids).logits
    with torch.no_grad():  # the hooks really run: a big up-projection changes the output
        for block in adapter.blocks.values():
            block.up.weight.normal_(std=1.0)
    big = float((model(input_ids=ids).logits - before).abs().max())
    small = float((after - before).abs().max())
    # to first order each block's contribution scales with its up-projection: at
    # UP_INIT_STD instead of 1.0 the change shrinks by that factor (10x slack for the
    # nonlinearity between), and it is not nothing
    from zoo.models.bottleneck import UP_INIT_STD

    assert 0 < small <= 10 * UP_INIT_STD * big, (small, big)
    adapter.detach()
    assert torch.equal(before, model(input_ids=ids).logits)


def test_qlora_entry_names_the_nf4_variant(tiny, zoo_home):
    zoo("train", "--base", "tiny", "--method", "qlora", "--data", DATA, "--name", "q",
        "--steps", "2")
    entry = zoo_json("show", "q")
    assert entry["kind"] == "qlora" and entry["base_variant"] == "nf4"
    base = zoo_json("show", "tiny")
    nf4 = base["variants"]["nf4"]
    assert nf4["quantization"]["quant_type"] == "nf4" and nf4["quantization"]["double_quant"]
    config = json.loads((Path(nf4["path"]) / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    adapter_config = json.loads((Path(entry["path"]) / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny@nf4"
    # the packed 4-bit weights are really there, not a 16-bit copy
    from zoo.core.files import read_safetensors_header
    header = read_safetensors_header(Path(nf4["path"]) / "model.safetensors")
    q = header["model.layers.0.self_attn.q_proj.weight"]
    assert q["dtype"] == "U8" and q["shape"] == [32 * 32 // 2, 1]


@pytest.mark.parametrize("line, why", [
    ('{"prompt": "hi"}', "'prompt' and 'completion' must both be strings"),
    ("not json", "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "the last message must be the assistant"),
    ('{"messages": [{"role": "robot", "content": "q"}]}', "message 0 needs a role"),
    ('["a list"]', "not a JSON object"),
])
def test_bad_data_is_refused_with_its_line_number(tiny, tmp_path, zoo_home, line, why):
    data = tmp_path / "bad.jsonl"
    good = DATA.read_text().splitlines()[:3]
    data.write_text("\n".join([*good, line, *good]) + "\n")
    result = zoo("train", "--base", "tiny", "--method", "lora", "--data", data, "--name", "bad",
                 "--steps", "1", ok=False)
    assert result.exit_code == 1
    assert f"bad.jsonl:4: {why}" in result.stderr
    assert "bad" not in [e["name"] for e in zoo_json("list")]
    assert not (zoo_home / "adapters" / "bad").exists()


@pytest.mark.parametrize("option, value", [
    ("--lr", "nan"), ("--lr", "0"), ("--alpha", "inf"), ("--rank", "0"), ("--steps", "-1"),
    ("--batch-size", "0"), ("--eval-split", "1"), ("--eval-split", "nan"), ("--targets", ","),
])
def test_settings_no_run_can_use_are_refused_before_it_starts(tiny, zoo_home, option, value):
    """Before, a NaN learning rate, steps -1, a batch size of 0 and no targets crashed
    (exit 2); --lr 0 and --rank 0 trained with the defaults and an eval split of 1 or NaN
    trained as asked (registered); an infinite alpha trained, then was refused."""
    result = zoo("train", "--base", "tiny", "--method", "lora", "--data", DATA, "--name", "s",
                 "--steps", "1", option, value, ok=False)
    assert result.exit_code == 1 and "cannot train with" in result.stderr
    assert option in result.stderr and "Traceback" not in result.stderr
    assert not (zoo_home / "adapters" / "s").exists()


def test_a_failed_run_registers_nothing(tiny, zoo_home, monkeypatch):
    def broken_save(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("zoo.train._save", broken_save)
    result = zoo("train", "--base", "tiny", "--method", "lora", "--data", DATA, "--name", "int",
                 "--steps", "1", ok=False)
    assert result.exit_code == 130
    assert "int" not in [e["name"] for e in zoo_json("list")]
    assert not (zoo_home / "adapters" / "int").exists()
    assert list((zoo_home / "tmp").iterdir()) == []


def test_generate_runs_every_kind(tiny):
    zoo("add", tiny.lora("plain"), "--name", "l", "--base", "tiny")
    zoo("add", tiny.bottleneck(), "--name", "b", "--base", "tiny")
    outputs = {}
    for args in (["--base", "tiny"], ["--adapter", "l"], ["--adapter", "b"]):
        outputs[args[1]] = zoo("generate", "hello", *args, "--max-tokens", "8").stdout
    # random adapters on a random model: each changes the greedy output
    assert len(set(outputs.values())) == 3, outputs


def test_chat_data_masks_everything_but_the_answers(models):
    from transformers import AutoTokenizer

    from zoo.models.data import IGNORE, Example, tokenize_example

    tok = AutoTokenizer.from_pretrained(models.llama)
    ex = Example([{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                  {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                  {"role": "assistant", "content": "B2"}])
    ids, labels = tokenize_example(tok, ex, 512)
    kept = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert kept == "A1</s>B2</s>"


@pytest.mark.slow
def test_lora_on_the_real_base_lowers_held_out_loss(real_home):
    result = train(TrainOptions(base="smollm2-135m-instruct", method="lora",
                                data=PACKAGE_DATA / "french.jsonl", name="fr", steps=8,
                                lr=2e-3, eval_split=0.25), Registry(real_home), progress=False)
    m = result.metrics
    assert m["eval_examples"] >= 10
    # measured on examples the adapter never saw, against the base's own loss on them
    assert m["eval_loss"] < 0.8 * m["eval_loss_before"], m
