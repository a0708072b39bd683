"""The worker's adapter reading (adapter_reading.py) against vLLM's own: same tensors,
same modules, same errors."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch
from safetensors import SafetensorError

from tests.helpers import memory_left_behind
from zoo.serve import adapter_reading


@pytest.fixture
def reading(monkeypatch):
    """adapter_reading installed in vLLM's lora_model for one test (vLLM's own after)."""
    from vllm.lora import lora_model, model_manager

    monkeypatch.setattr(lora_model, "safetensors", lora_model.safetensors)
    monkeypatch.setattr(lora_model, "parse_fine_tuned_lora_name",
                        lora_model.parse_fine_tuned_lora_name)
    monkeypatch.setattr(model_manager, "str", str, raising=False)  # gone again after
    return adapter_reading.install


def load(path, expected=("q_proj", "v_proj", "k_proj", "o_proj")):
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.models.llama import LlamaForCausalLM

    mapper = LlamaForCausalLM.hf_to_vllm_mapper.get_rename_mapper()
    return LoRAModel.from_local_checkpoint(
        str(path), set(expected), PEFTHelper.from_local_dir(str(path), 4096),
        lora_model_id=1, device="cpu", dtype=torch.bfloat16, model_vocab_size=256,
        weights_mapper=mapper)


def test_a_whole_file_reads_as_safe_open_does(models):
    path = models.lora("reading") / "adapter_model.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as theirs, \
            adapter_reading.WholeFile(path) as mine:
        assert mine.keys() == list(theirs.keys())
        for key in theirs.keys():
            assert torch.equal(mine.get_tensor(key), theirs.get_tensor(key))
            assert mine.get_tensor(key).dtype == theirs.get_tensor(key).dtype
    with pytest.raises(ValueError, match="CPU"):
        adapter_reading.WholeFile(path, device="cuda")


def test_vllm_loads_the_same_adapter_through_it(models, reading):
    path = models.lora("reading-all", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    theirs = load(path)
    reading()
    mine, again = load(path), load(path)  # the second answers names from memory
    assert list(mine.loras) == list(theirs.loras) == list(again.loras)
    for name, lora in theirs.loras.items():
        for got in (mine.loras[name], again.loras[name]):
            assert got.rank == lora.rank and got.scaling == lora.scaling
            assert torch.equal(got.lora_a, lora.lora_a) and torch.equal(got.lora_b, lora.lora_b)


def test_an_adapter_vllm_refuses_is_still_refused(models, reading, tmp_path):
    reading()
    with pytest.raises(ValueError, match="expected target modules"):
        load(models.lora("reading"), expected=("o_proj",))  # it trains q and v
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(SafetensorError, match="invalid header length"):  # as safe_open's
        load(broken)


def test_remembered_names_answer_as_vllm_for_each_map():
    from vllm.lora.utils import parse_fine_tuned_lora_name
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.utils import WeightsMapper

    remembered = adapter_reading.RememberedNames(parse_fine_tuned_lora_name)
    names = [f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
             for i in range(3) for p in "qv" for ab in "AB"]
    renames = WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."})
    for mapper in (LlamaForCausalLM.hf_to_vllm_mapper.get_rename_mapper(),
                   LlamaForCausalLM.hf_to_vllm_mapper.get_rename_mapper(),  # equal, new
                   renames, None):
        for name in names * 2:
            assert remembered(name, mapper) == parse_fine_tuned_lora_name(name, mapper)
    assert remembered("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                      renames)[0].startswith("language_model.")
    remembered.LIMIT = 4
    for name in (n.replace("layers.", "layers.1") for n in names):  # names not seen yet
        assert remembered(name) == parse_fine_tuned_lora_name(name)
    assert len(remembered._answers) <= 4


def test_a_tensors_text_answers_what_the_model_manager_asks_of_it(reading):
    """In vLLM's model_manager, ``str`` of a tensor (a packed adapter's first one, taken
    for its device) is not "cpu", as torch's text of it is not, without torch formatting
    its numbers; anything else's text is Python's. The patch checks that str is called
    there once, for that comparison."""
    from vllm.lora import model_manager

    from zoo.serve.plugin import _str_only_names_a_device

    reading()
    tensor = torch.ones(8, 576, dtype=torch.bfloat16)
    assert model_manager.str(tensor) != "cpu" and str(tensor) != "cpu"
    for value in (torch.device("cpu"), tensor.device, None, 3, [tensor.device]):
        assert model_manager.str(value) == str(value)
    assert model_manager.str(b"cpu", "ascii") == "cpu"
    assert _str_only_names_a_device("vllm.lora.model_manager") is None
    assert "otherwise" in _str_only_names_a_device("vllm.lora.utils")


def test_reading_adapters_keeps_nothing_behind(models, tmp_path):
    """The worker reads every new adapter of its life this way: nothing may stay (the
    mmap reader of safetensors 0.8.0 kept two objects per tensor, test_eval.py)."""
    from tests.factory import ALL_PROJECTIONS, write_random_lora

    path = write_random_lora(tmp_path / "lora", models.llama, rank=4,
                             targets=ALL_PROJECTIONS) / "adapter_model.safetensors"

    def read(times: int) -> None:
        for _ in range(times):
            with adapter_reading.WholeFile(path) as f:
                [f.get_tensor(k) for k in f.keys()]

    read(30)
    grown = memory_left_behind(lambda: read(400))
    assert grown < 8_000, grown  # not one object per adapter read


def test_rescaling_with_kept_plans_gives_the_same_numbers(models, tmp_path):
    """The worker keeps each tensor name's rescaling between adapters, and rescales the
    float32 tensors in bulk: bit for bit what working each tensor out alone gives, for
    every projection, float32 and bfloat16, and for other LoRAs."""
    from safetensors.torch import load_file

    from tests.factory import ALL_PROJECTIONS, write_random_lora
    from zoo.models.smoothing import PLANS_KEPT, _rescaled, _rescaling, adapt_tensors

    config = json.loads((models.llama / "config.json").read_text())
    kv = config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    widths = {"attn_in": config["hidden_size"], "mlp_in": config["hidden_size"],
              "down_in": config["intermediate_size"], "v_out": kv}
    g = torch.Generator().manual_seed(0)
    scales = {f"layers.{i}.{k}": torch.rand(n, generator=g) + 0.5
              for i in range(config["num_hidden_layers"]) for k, n in widths.items()}
    scales |= {"_kv_heads": config["num_key_value_heads"],
               "_group": config["num_attention_heads"] // config["num_key_value_heads"]}
    plans = {}
    for seed, targets in ((1, ALL_PROJECTIONS), (2, ["q_proj", "v_proj"]), (3, ALL_PROJECTIONS)):
        tensors = load_file(write_random_lora(tmp_path / f"l{seed}", models.llama, rank=4,
                                              seed=seed, targets=targets)
                            / "adapter_model.safetensors")
        tensors |= {k: v.to(torch.bfloat16) for k, v in list(tensors.items())[::5]}
        kept, fresh = adapt_tensors(tensors, scales, plans), adapt_tensors(tensors, scales)
        assert list(kept) == list(fresh) == list(tensors)
        for key in fresh:
            # each tensor as rescaling it alone gives (the float32 ones are rescaled in bulk)
            plan = _rescaling(key, scales)
            alone = tensors[key] if plan is None else _rescaled(tensors[key], *plan)
            for mine in (kept[key], fresh[key]):
                assert mine.dtype == alone.dtype and torch.equal(mine, alone)
                assert mine.is_contiguous()
        assert any(not torch.equal(fresh[k], tensors[k]) for k in fresh)
    assert len(plans) == 2 * 7 * config["num_hidden_layers"]
    full = dict.fromkeys(range(PLANS_KEPT + 1))
    adapt_tensors({}, scales, full)
    assert full == {}  # past PLANS_KEPT names it starts afresh
