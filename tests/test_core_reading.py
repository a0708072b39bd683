"""An adapter read in the engine core (zoo/serve/core_reading.py) against the worker's
own read of it: the same model, the same refusals, and the worker placing what it was
sent in place of reading the file."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from vllm.lora.request import LoRARequest

from tests.factory import ALL_PROJECTIONS, write_random_lora
from zoo.serve import core_reading

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@pytest.fixture
def hand_over(monkeypatch):
    """The worker's hand-over installed for one test (vLLM's _load_adapter after)."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    monkeypatch.setattr(WorkerLoRAManager, "_load_adapter", WorkerLoRAManager._load_adapter)
    core_reading.install_worker_side()
    assert core_reading.handing_over()


def worker(max_rank: int = 8):
    """A vLLM worker as the core reading sees it: its LoRA manager vLLM's own class,
    holding what a Llama engine's holds, its checks of the model recorded."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.model_executor.models.llama import LlamaForCausalLM

    checked = []
    manager = WorkerLoRAManager.__new__(WorkerLoRAManager)
    manager.__dict__.update(
        max_position_embeddings=4096, vocab_size=256, _lora_model_cls=LoRAModel,
        lora_config=LoRAConfig(max_lora_rank=max_rank, max_loras=2, lora_dtype=torch.bfloat16),
        _adapter_manager=SimpleNamespace(
            supported_lora_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
            packed_modules_mapping=PACKED, moe_ep_load_spec=None,
            model=SimpleNamespace(hf_to_vllm_mapper=LlamaForCausalLM.hf_to_vllm_mapper),
            **{name: (lambda lora, name=name: checked.append((name, lora)))
               for name in ("_validate_moe_lora_format", "_validate_modules_to_save",
                            "_validate_token_classification_lora")}))
    return SimpleNamespace(model_runner=SimpleNamespace(lora_manager=manager)), checked


def same_model(mine, theirs) -> None:
    assert mine.id == theirs.id and mine.rank == theirs.rank
    assert list(mine.loras) == list(theirs.loras)
    for name, lora in theirs.loras.items():
        got = mine.loras[name]
        assert (got.module_name, got.rank, got.scaling) == (lora.module_name, lora.rank,
                                                           lora.scaling)
        for a, b in ((got.lora_a, lora.lora_a), (got.lora_b, lora.lora_b)):
            assert a.dtype == b.dtype and torch.equal(a, b)


def optimized(model):
    """``model`` as the worker's add_lora leaves it: each layer's scaling folded into its B
    by vLLM's own ``optimize``."""
    for lora in model.loras.values():
        lora.optimize()
    return model


def test_the_core_reads_what_the_worker_reads(models, tmp_path, hand_over):
    """The model the core sends is the one the worker reads, each layer's scaling
    already folded into its B (as the worker's add_lora does to every layer)."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    path = write_random_lora(tmp_path / "all", models.llama, rank=4, targets=ALL_PROJECTIONS)
    config = json.loads((path / "adapter_config.json").read_text())
    config["lora_alpha"] = 12  # a scaling (3) whose product with B is rounded
    (path / "adapter_config.json").write_text(json.dumps(config))
    request = LoRARequest("acme/all:v1", 5, str(path))
    theirs = WorkerLoRAManager._load_adapter.__wrapped__(
        worker()[0].model_runner.lora_manager, request)
    assert {lora.scaling for lora in theirs.loras.values()} == {3.0}
    context = core_reading.context_of(worker()[0])
    context = pickle.loads(pickle.dumps(context))  # it crosses from worker to core
    mine = core_reading.read(context, request)
    assert {lora.scaling for lora in mine.loras.values()} == {1}
    same_model(mine, optimized(theirs))
    assert len(theirs.loras) == 7 * 2  # every projection of the tiny Llama's two layers


def test_the_core_refuses_what_the_worker_refuses(models, tmp_path, hand_over):
    """DoRA, a rank over the engine's, a missing adapter: the worker's own error."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    vllms = WorkerLoRAManager._load_adapter.__wrapped__
    context = core_reading.context_of(worker(max_rank=8)[0])
    cases = [models.lora("dora", use_dora=True), models.lora("rank16", r=16),
             tmp_path / "nowhere"]
    messages = []
    for lora_id, path in enumerate(cases, start=1):
        request = LoRARequest(f"acme/{lora_id}:v1", lora_id, str(path))
        with pytest.raises(Exception) as theirs:
            vllms(worker(max_rank=8)[0].model_runner.lora_manager, request)
        with pytest.raises(type(theirs.value)) as mine:
            core_reading.read(context, request)
        assert str(mine.value) == str(theirs.value)
        messages.append(str(mine.value))
    assert "DoRA" in messages[0] and "max_lora_rank 8" in messages[1]


def test_the_worker_places_what_it_was_sent(models, hand_over):
    """place: the worker's add_lora gets the model sent (after vLLM's checks of it),
    not the file's; nothing sent stays behind, even when add_lora fails; without a
    model sent the worker reads the file itself, as vLLM does."""
    path = models.lora("sent")
    request = LoRARequest("acme/sent:v1", 4, str(path))
    stand_in, checked = worker()
    manager = stand_in.model_runner.lora_manager
    got = []
    stand_in.add_lora = lambda r: got.append(manager._load_adapter(r)) or True
    sent = core_reading.read(core_reading.context_of(stand_in), request)
    assert core_reading.place(stand_in, request, sent) is True
    assert got == [sent]
    assert [lora for _, lora in checked] == [sent] * 3
    assert not manager.__dict__[core_reading._HANDED]

    def failing(r):
        raise RuntimeError("no slot")

    stand_in.add_lora = failing
    with pytest.raises(RuntimeError):
        core_reading.place(stand_in, request, sent)
    assert not manager.__dict__[core_reading._HANDED]
    read_itself = manager._load_adapter(request)
    assert read_itself is not sent
    same_model(optimized(read_itself), sent)


def test_the_core_reads_only_where_the_worker_says_how(hand_over, monkeypatch):
    """No LoRA manager, a mixture-of-experts layout, or no hand-over in the worker: the
    worker reads its adapters itself."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    assert core_reading.context_of(worker()[0]) is not None
    assert core_reading.context_of(SimpleNamespace(model_runner=SimpleNamespace())) is None
    moe, _ = worker()
    moe.model_runner.lora_manager._adapter_manager.moe_ep_load_spec = object()
    assert core_reading.context_of(moe) is None
    monkeypatch.setattr(WorkerLoRAManager, "_load_adapter",
                        WorkerLoRAManager._load_adapter.__wrapped__)
    assert not core_reading.handing_over()
    assert core_reading.context_of(worker()[0]) is None
