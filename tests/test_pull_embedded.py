"""The shipped catalog and the embedded base built from the packaged GGUF."""

from __future__ import annotations

import json

import pytest

from tests.conftest import check_registry
from tests.helpers import zoo, zoo_json
from zoo.catalog.shipped import shipped_catalog, shipped_catalog_path

BASE = "smollm2-135m-instruct"


def test_shipped_catalog_matches_the_schema():
    data = check_registry(shipped_catalog_path())
    assert BASE in data["entries"]
    assert all(e["path"] is None for e in data["entries"].values())


def test_embedded_base_is_real_and_registered(real_home):
    entry = zoo_json("show", BASE)
    shipped = shipped_catalog().base(BASE)
    for field in ("architecture", "hidden_size", "num_layers", "vocab_size", "dtype", "parameters"):
        assert entry[field] == getattr(shipped, field), field
    assert (entry["hidden_size"], entry["num_layers"]) == (576, 30)
    assert entry["source"]["sha256"] == shipped.source["sha256"]
    assert set(entry["files"]) >= {"config.json", "model.safetensors", "tokenizer.json",
                                   "chat_template.jinja", "generation_config.json"}
    config = json.loads((real_home / "bases" / BASE / "config.json").read_text())
    assert "quantization_config" not in config
    assert zoo("verify", BASE).exit_code == 0


def test_second_pull_is_a_no_op(real_home):
    before = (real_home / "registry.json").read_text()
    result = zoo("pull", BASE)
    assert "already in the zoo (nothing to do)" in result.stdout
    assert (real_home / "registry.json").read_text() == before


def test_pull_refuses_a_damaged_copy(real_home):
    config = real_home / "bases" / BASE / "generation_config.json"
    config.unlink()  # a hard link into the session home: unlink, never edit in place
    config.write_text("{}")
    result = zoo("pull", BASE, ok=False)
    assert result.exit_code == 1 and "generation_config.json" in result.stderr


def test_unknown_short_name(real_home):
    result = zoo("pull", "no-such-thing", ok=False)
    assert result.exit_code == 1
    assert "smollm2-135m-instruct" in result.stderr  # the hint lists the known names


@pytest.mark.slow
def test_embedded_base_answers(real_home):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_home / "bases" / BASE
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
