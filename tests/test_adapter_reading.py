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
    monkeypatch.setattr(lora_model.LoRAModel, "from_lora_tensors",
                        lora_model.LoRAModel.__dict__["from_lora_tensors"])
    monkeypatch.setattr(adapter_reading, "_RESCALE", {})
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
    scales = _random_scales(models.llama)
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


def _random_scales(base, seed: int = 0) -> dict:
    """Smoothing scales for every layer of the tiny ``base``, as zoo_smoothing.scales holds."""
    config = json.loads((base / "config.json").read_text())
    kv = config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    widths = {"attn_in": config["hidden_size"], "mlp_in": config["hidden_size"],
              "down_in": config["intermediate_size"], "v_out": kv}
    g = torch.Generator().manual_seed(seed)
    scales = {f"layers.{i}.{k}": torch.rand(n, generator=g) + 0.5
              for i in range(config["num_hidden_layers"]) for k, n in widths.items()}
    return scales | {"_kv_heads": config["num_key_value_heads"],
                     "_group": config["num_attention_heads"] // config["num_key_value_heads"]}


def _bits(tensor):
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()])


def test_a_plain_lora_file_is_lent_and_settles_to_the_numbers_read_one_by_one(
        models, tmp_path, monkeypatch):
    """A plain LoRA file's tensors are lent from the thread's buffer, and settle into the
    adapter's own: bit for bit what safetensors' tensors give rescaled one by one
    (adapt_tensors) and then converted (vLLM's .to), for float32, bfloat16 and float16
    files, each LoRA dtype, with and without a smoothed base's scales; a file read next
    leaves them as they were."""
    from safetensors.torch import load_file

    from tests.factory import ALL_PROJECTIONS, write_random_lora
    from zoo.models.smoothing import adapt_tensors

    monkeypatch.setattr(adapter_reading, "_RESCALE", {})
    scales = _random_scales(models.llama)
    other = write_random_lora(tmp_path / "other", models.llama, rank=2, seed=9)
    for dtype in (None, torch.bfloat16, torch.float16):
        path = write_random_lora(tmp_path / f"l-{dtype}", models.llama, rank=4,
                                 targets=ALL_PROJECTIONS, dtype=dtype, seed=3)
        read = load_file(path / "adapter_model.safetensors")
        for rescaled in (False, True):
            adapter_reading._RESCALE.clear()
            if rescaled:
                adapter_reading.rescale_with(scales)
            for target in (torch.bfloat16, torch.float32, torch.float16, None):
                with adapter_reading.WholeFile(path / "adapter_model.safetensors") as f:
                    lent = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
                assert adapter_reading._THREAD.lent is not None
                settled = adapter_reading.settle(lent, target)
                assert isinstance(settled, adapter_reading.Settled)
                assert adapter_reading.settle(settled, target) is settled
                expected = adapt_tensors(read, scales) if rescaled else read
                expected = {k: v.to(target or v.dtype) for k, v in expected.items()}
                with adapter_reading.WholeFile(other / "adapter_model.safetensors") as f:
                    f.get_tensor(f.keys()[0])  # the buffer read over
                assert list(settled) == list(lent) == sorted(read)
                for key, value in expected.items():
                    assert settled[key].dtype == value.dtype
                    assert torch.equal(_bits(settled[key]), _bits(value)), (dtype, target, key)
        rescaled = adapt_tensors(read, scales)
        assert any(not torch.equal(rescaled[k].float(), read[k].float()) for k in read)


def test_other_files_are_read_as_before_and_a_mix_is_copied(models, tmp_path):
    """Only a plain LoRA file is lent: one with another kind of tensor, or tensors of two
    dtypes, is safetensors' own; lent tensors among others are copied, not settled; lent
    tensors read over by a later read are refused, not passed on."""
    from safetensors.torch import load_file, save_file

    from tests.factory import write_random_lora

    path = write_random_lora(tmp_path / "l", models.llama, rank=2) / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    for name, extra in (("embedding", {"base_model.model.embed_tokens.lora_embedding_A":
                                       torch.ones(2, 8)}),
                        ("dtypes", {key: tensors[key].to(torch.bfloat16)})):
        odd = tmp_path / f"{name}.safetensors"
        save_file(tensors | extra, odd)
        with adapter_reading.WholeFile(odd) as f:
            got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        assert adapter_reading._THREAD.lent is None
        assert adapter_reading.settle(got, torch.bfloat16) is got
        assert all(torch.equal(got[k], v) for k, v in (tensors | extra).items())
    with adapter_reading.WholeFile(path) as f:
        lent = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    mixed = lent | {"extra": torch.ones(3)}
    copied = adapter_reading.settle(mixed, torch.bfloat16)
    assert not isinstance(copied, adapter_reading.Settled) and copied["extra"] is mixed["extra"]
    assert all(torch.equal(copied[k], lent[k]) and copied[k].data_ptr() != lent[k].data_ptr()
               for k in lent)
    with adapter_reading.WholeFile(path) as f:
        stale = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with adapter_reading.WholeFile(path) as f:
        f.keys()  # read over the same buffer before they settled
    with pytest.raises(RuntimeError, match="read over"):
        adapter_reading.settle(stale, torch.bfloat16)


@pytest.mark.parametrize("smoothed_first", [True, False], ids=["smoothed-inner", "smoothed-outer"])
def test_vllm_loads_a_smoothed_bases_adapter_rescaled_once_through_it(
        models, reading, tmp_path, monkeypatch, smoothed_first):
    """On a smoothed base, vLLM's load through the lent tensors gives the adapter
    rescaled once, as the stored tensors rescaled one by one give it, whichever of the two
    patches wraps the other."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from tests.factory import write_random_lora
    from zoo.models.smoothing import adapt_tensors, save_scales
    from zoo.serve import plugin
    from zoo.serve.policy import MODEL_VARIABLE

    config = SimpleNamespace(**json.loads((models.llama / "config.json").read_text()))
    scales = _random_scales(models.llama, seed=4)
    smoothed = tmp_path / "smoothed"
    smoothed.mkdir()
    save_scales(smoothed, {k: v for k, v in scales.items() if not k.startswith("_")}, config)
    monkeypatch.setenv(MODEL_VARIABLE, str(smoothed))
    path = write_random_lora(tmp_path / "lora", models.llama, rank=4,
                             targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    expected = {k: v.to(torch.bfloat16) for k, v in
                adapt_tensors(load_file(path / "adapter_model.safetensors"), scales).items()}
    order = [plugin.SMOOTHED_LORA, plugin.ADAPTER_READING]
    assert plugin.install(order if smoothed_first else order[::-1]).applied
    model = load(path)
    assert adapter_reading._THREAD.lent is None  # settled
    assert model.loras
    for name, lora in model.loras.items():
        stem = f"base_model.model.{name}"
        assert torch.equal(_bits(lora.lora_a), _bits(expected[f"{stem}.lora_A.weight"]))
        assert torch.equal(_bits(lora.lora_b), _bits(expected[f"{stem}.lora_B.weight"]))


@pytest.mark.parametrize("header", [
    b'{"a.lora_A.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, -4]}}',
    b'{"a.lora_A.weight": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}',
    b'{"a.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}',
    b'{"a.lora_A.weight": {"dtype": "F32", "shape": [2]}}',
    b'[1, 2]', b'\xff{', b'{}'])
def test_a_header_that_is_not_a_plain_lora_files_is_left_to_safetensors(header):
    """Any header but a plain LoRA file's, well formed or not, lends nothing (safetensors
    then reads the file and says what is wrong with it)."""
    adapter_reading._LAYOUTS.pop(header, None)
    assert adapter_reading._layout(header) is None
