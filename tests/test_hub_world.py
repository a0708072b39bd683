"""The world's adapters and bases in, Hub-native repos out: zoo against repos it did not
make (PEFT's own, plain model repos) and the tools that read what zoo pushes (PEFT's
AutoPeftModel and transformers' from_pretrained, fetching from the test Hub)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bounds import assert_within, forward_bound
from tests.helpers import zoo, zoo_json
from zoo.testing.hub import HubServer

WRITE = "hf_writer_token_0001"
BASE_REPO = "SomeOrg/Tiny-Llama"  # mixed case, as Hub ids often are


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = HubServer(tmp_path / "hub-root", write_tokens=[WRITE]).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", WRITE)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.shutdown()


def api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=WRITE)


def upload(hub, repo: str, folder: Path, **kwargs) -> str:
    """A repo made by someone else, with huggingface_hub itself (weights through LFS)."""
    client = api(hub)
    client.create_repo(repo, exist_ok=True)
    return client.upload_folder(repo_id=repo, folder_path=str(folder), **kwargs).oid


def run_elsewhere(hub, tmp_path: Path, code: str) -> str:
    """Python in a fresh process pointed at the test Hub (PEFT and transformers read the
    endpoint when imported), with a cache of its own: the stdout."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE,
           "HF_HOME": str(tmp_path / "elsewhere-hf"), "HF_HUB_DISABLE_XET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def base_repo(hub, models, tmp_path):
    """A tiny Llama on the Hub the way people publish models: weights, tokenizer, chat
    template, and files zoo has no use for."""
    folder = tmp_path / "base-repo"
    shutil.copytree(models.llama, folder)
    (folder / "training_args.bin").write_bytes(b"\x80\x04not for zoo")
    (folder / "optimizer.pt").write_bytes(b"\x80\x04not for zoo either")
    upload(hub, BASE_REPO, folder)
    return folder


def lora_repo(hub, models, tmp_path, repo: str, named: str | None, **config) -> Path:
    folder = tmp_path / repo.replace("/", "--")
    shutil.copytree(models.lora(repo.replace("/", "-"), **config), folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = named
    (folder / "adapter_config.json").write_text(json.dumps(data))
    upload(hub, repo, folder)
    return folder


def test_a_base_model_repo_is_pulled_as_a_base_with_its_hub_identity(hub, base_repo, zoo_home):
    result = zoo("pull", BASE_REPO)
    assert "pulled someorg/tiny-llama (base)" in result.stdout
    entry = zoo_json("show", "someorg/tiny-llama")
    assert entry["kind"] == "base" and entry["architecture"] == "LlamaForCausalLM"
    assert entry["hub"]["repo"] == BASE_REPO and len(entry["hub"]["commit"]) == 40
    assert entry["hub"]["commit"] == api(hub).repo_info(BASE_REPO).sha
    stored = set(entry["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= stored
    assert not stored & {"training_args.bin", "optimizer.pt", ".gitattributes"}
    downloaded = {f for m, f, _ in hub.downloads if m == "GET"}
    assert not any(f.endswith(("training_args.bin", "optimizer.pt")) for f in downloaded)
    out = zoo("generate", "hi", "--adapter", "someorg/tiny-llama", "--max-tokens", "3", ok=False)
    assert out.exit_code != 0 or out.stdout  # a base is not an adapter; it must not crash
    assert "already in the zoo" in zoo("pull", BASE_REPO).stdout


def test_a_sharded_base_pulls_whole(hub, models, tmp_path, zoo_home):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(models.llama)
    model.save_pretrained(folder, max_shard_size="20KB")
    for f in models.llama.iterdir():
        if f.name.startswith(("tokenizer", "special", "chat")):
            shutil.copy(f, folder / f.name)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    upload(hub, "someorg/sharded", folder)
    zoo("pull", "someorg/sharded")
    entry = zoo_json("show", "someorg/sharded")
    assert set(shards) | {"model.safetensors.index.json"} <= set(entry["files"])
    assert entry["parameters"] == sum(p.numel() for p in model.parameters())


def test_a_plain_peft_repo_resolves_its_base_by_hub_id(hub, base_repo, models, tmp_path,
                                                      zoo_home):
    zoo("pull", BASE_REPO)
    lora_repo(hub, models, tmp_path, "someone/plain-lora", BASE_REPO)
    # PEFT writes the path it loaded the base from: a local folder or the Hub cache
    cache_path = "/root/.cache/huggingface/hub/models--SomeOrg--Tiny-Llama/snapshots/0123abc"
    lora_repo(hub, models, tmp_path, "someone/cached-lora", cache_path, seed=5)
    lora_repo(hub, models, tmp_path, "someone/local-lora", "/models/SomeOrg/Tiny-Llama", seed=6)
    for repo in ("someone/plain-lora", "someone/cached-lora", "someone/local-lora"):
        zoo("pull", repo)
        entry = zoo_json("show", repo)
        assert entry["base"] == "someorg/tiny-llama" and entry["kind"] == "lora", repo
        assert set(entry["files"]) - {"README.md"} == {"adapter_config.json",
                                                       "adapter_model.safetensors"}
        assert entry["hub"]["repo"] == repo and entry["source"]["type"] == "hub"
    # --base works as on zoo add
    lora_repo(hub, models, tmp_path, "someone/nameless", None, seed=7)
    result = zoo("pull", "someone/nameless", ok=False)
    assert result.exit_code == 1 and "--base" in result.stderr
    zoo("pull", "someone/nameless", "--base", "someorg/tiny-llama")
    assert zoo_json("show", "someone/nameless")["base"] == "someorg/tiny-llama"


def test_a_missing_base_is_named_and_with_base_pulls_it(hub, base_repo, models, tmp_path,
                                                       zoo_home):
    lora_repo(hub, models, tmp_path, "someone/plain-lora", BASE_REPO)
    result = zoo("pull", "someone/plain-lora", ok=False)
    assert result.exit_code == 1 and BASE_REPO in result.stderr
    assert f"zoo pull {BASE_REPO}" in result.stderr and "--with-base" in result.stderr
    assert not (zoo_home / "registry.json").exists() or zoo_json("list") == []
    zoo("pull", "someone/plain-lora", "--with-base")
    assert zoo_json("show", "someone/plain-lora")["base"] == "someorg/tiny-llama"
    assert zoo_json("show", "someorg/tiny-llama")["hub"]["repo"] == BASE_REPO


def test_the_embedded_base_is_found_by_its_hub_id(hub, real_home, tmp_path):
    """The shape of nearly every LoRA on the Hub: a PEFT repo naming the real base by id."""
    from tests.factory import write_random_lora

    base = zoo_json("show", "smollm2-135m-instruct")
    assert base["hub"]["repo"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "GGUF" in base["hub"]["weights"]  # built here: its hashes are not the Hub's
    folder = write_random_lora(tmp_path / "smol-lora", Path(base["path"]), seed=3,
                               targets=("q_proj", "v_proj"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    upload(hub, "someone/smol-lora", folder)
    zoo("pull", "someone/smol-lora")
    entry = zoo_json("show", "someone/smol-lora")
    assert entry["base"] == "smollm2-135m-instruct" and entry["servable"]


class Payload:
    """Pickled, this runs code when loaded: what a weights-only loader must refuse."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_adapter_is_converted_and_its_code_never_runs(hub, base_repo, models,
                                                                tmp_path, zoo_home):
    from safetensors.torch import load_file

    zoo("pull", BASE_REPO)
    folder = lora_repo(hub, models, tmp_path, "someone/legacy", BASE_REPO)
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    api(hub).delete_file("adapter_model.safetensors", "someone/legacy")
    upload(hub, "someone/legacy", folder)
    zoo("pull", "someone/legacy")
    entry = zoo_json("show", "someone/legacy")
    assert set(entry["files"]) - {"README.md"} == {"adapter_config.json",
                                                   "adapter_model.safetensors"}
    assert "weights-only" in entry["source"]["converted"]
    converted = load_file(Path(entry["path"]) / "adapter_model.safetensors")
    assert converted.keys() == tensors.keys()
    assert all(torch.equal(converted[k], tensors[k]) for k in tensors)
    # a pickle that would run code is refused, and its code never runs
    marker = tmp_path / "pwned"
    torch.save({"x": torch.zeros(1), "y": Payload(str(marker))}, folder / "adapter_model.bin")
    upload(hub, "someone/evil", folder)
    result = zoo("pull", "someone/evil", ok=False)
    assert result.exit_code == 1 and "not a plain tensor file" in result.stderr
    assert not marker.exists()
    assert "someone/evil" not in {e["name"] for e in zoo_json("list")}


def test_bad_repos_register_nothing(hub, base_repo, models, tmp_path, zoo_home):
    zoo("pull", BASE_REPO)
    before = (zoo_home / "registry.json").read_text()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "README.md").write_text("# just words\n")
    (junk / "notes.txt").write_text("nothing to load\n")
    upload(hub, "someone/junk", junk)
    result = zoo("pull", "someone/junk", ok=False)
    assert result.exit_code == 1 and "neither an adapter nor a model" in result.stderr
    lora_repo(hub, models, tmp_path, "someone/too-wide", BASE_REPO, seed=8,
              base=models.llama_wide)
    result = zoo("pull", "someone/too-wide", ok=False)
    assert result.exit_code == 1 and "shape" in result.stderr.lower()
    folder = lora_repo(hub, models, tmp_path, "someone/shifting", BASE_REPO, seed=9)
    weights = bytearray((folder / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # the same size, other bytes
    hub.tamper["someone/shifting/adapter_model.safetensors"] = bytes(weights)
    result = zoo("pull", "someone/shifting", ok=False)
    assert result.exit_code == 1 and "changed between listing and download" in result.stderr
    hub.tamper["someone/shifting/adapter_model.safetensors"] = bytes(weights[:-10])
    result = zoo("pull", "someone/shifting", ok=False)  # another size
    assert result.exit_code == 1 and "changed between listing and download" in result.stderr
    assert (zoo_home / "registry.json").read_text() == before
    assert not list((zoo_home / "tmp").iterdir())


def test_what_zoo_pushes_loads_in_peft_and_transformers_from_the_hub(
        hub, base_repo, models, tmp_path, zoo_home):
    """A pushed adapter names its base by Hub id: PEFT's AutoPeftModel fetches both from the
    Hub and computes zoo's logits; a pushed merged model loads with from_pretrained; the
    cards carry the Hub's own metadata, so its model tree links them."""
    zoo("pull", BASE_REPO)
    zoo("add", models.lora("pushed"), "--name", "acme/lora", "--base", "someorg/tiny-llama")
    zoo("push", "acme/lora", "--repo", "acme/lora")
    zoo("merge", "--adapter", "acme/lora", "--name", "acme/merged", "--dtype", "fp32")
    zoo("push", "acme/merged", "--repo", "acme/merged")
    ids = [[5, 9, 12, 30, 41, 7]]
    code = f"""
import json, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM
ids = torch.tensor({ids})
adapter = AutoPeftModelForCausalLM.from_pretrained("acme/lora", dtype=torch.float32).eval()
merged = AutoModelForCausalLM.from_pretrained("acme/merged", dtype=torch.float32).eval()
with torch.no_grad():
    print(json.dumps([adapter(input_ids=ids).logits.tolist(), merged(input_ids=ids).logits.tolist()]))
"""
    peft_logits, merged_logits = map(torch.tensor, json.loads(run_elsewhere(hub, tmp_path, code)))
    from zoo.catalog.loading import load_adapted
    from zoo.catalog.registry import Registry

    model = load_adapted(Registry(), Registry().load().adapter("acme/lora"))[0]
    with torch.no_grad():
        ours = model(input_ids=torch.tensor(ids)).logits
    bound = forward_bound(float(ours.abs().max()), 64 + 4, layers=2)
    assert_within(peft_logits, ours, bound, "PEFT from the Hub vs zoo")
    assert_within(merged_logits, ours, bound, "merged model from the Hub vs zoo")
    config = json.loads(Path(api(hub).hf_hub_download(
        "acme/lora", "adapter_config.json", cache_dir=tmp_path / "c")).read_text())
    assert config["base_model_name_or_path"] == BASE_REPO
    cards = {repo: api(hub).model_info(repo).card_data for repo in ("acme/lora", "acme/merged")}
    assert cards["acme/lora"].base_model == BASE_REPO
    assert cards["acme/lora"].base_model_relation == "adapter"
    assert cards["acme/lora"].library_name == "peft"
    assert cards["acme/merged"].base_model == BASE_REPO
    assert cards["acme/merged"].base_model_relation == "merge"
    assert cards["acme/merged"].library_name == "transformers"
    for repo in ("acme/lora", "acme/merged"):
        readme = Path(api(hub).hf_hub_download(repo, "README.md", cache_dir=tmp_path / "c"))
        assert "zoo.invalid" not in readme.read_text()


def test_a_repo_peft_pushed_pulls_into_zoo(hub, base_repo, tmp_path, zoo_home):
    """PEFT's own push_to_hub, of an adapter trained on the base fetched from the Hub."""
    code = f"""
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
base = AutoModelForCausalLM.from_pretrained("{BASE_REPO}", dtype=torch.float32)
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False))
model.push_to_hub("peftuser/adapter")
"""
    run_elsewhere(hub, tmp_path, code)
    zoo("pull", "peftuser/adapter", "--with-base")
    entry = zoo_json("show", "peftuser/adapter")
    assert entry["base"] == "someorg/tiny-llama" and entry["rank"] == 4 and entry["servable"]
    assert zoo("generate", "hello", "--adapter", "peftuser/adapter", "--max-tokens", "3").stdout


def test_sync_carries_adapters_pulled_without_zoo_json(hub, base_repo, models, tmp_path,
                                                      monkeypatch):
    """And the base they belong to, pulled from the Hub: the other machine pulls it from the
    same commit first, checked against the index's content hash."""
    lora_repo(hub, models, tmp_path, "someone/plain-lora", BASE_REPO)
    homes = {machine: tmp_path / f"home-{machine}" for machine in ("a", "b")}
    monkeypatch.setenv("ZOO_HOME", str(homes["a"]))
    zoo("pull", BASE_REPO)
    zoo("pull", "someone/plain-lora")
    zoo("sync", "--repo", "someone/index")
    api(hub).upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=BASE_REPO)
    monkeypatch.setenv("ZOO_HOME", str(homes["b"]))
    out = zoo("sync", "--repo", "someone/index").stdout
    assert "pulled: someorg/tiny-llama, someone/plain-lora" in out, out
    b = {n: zoo_json("show", n) for n in ("someone/plain-lora", "someorg/tiny-llama")}
    assert b["someorg/tiny-llama"]["hub"]["commit"] != api(hub).repo_info(BASE_REPO).sha
    monkeypatch.setenv("ZOO_HOME", str(homes["a"]))
    for name, entry in b.items():
        assert entry["content_hash"] == zoo_json("show", name)["content_hash"], name


def test_a_pushed_nf4_variant_loads_with_from_pretrained(hub, models, tmp_path, zoo_home):
    zoo("add", models.llama_blocks, "--name", "blocks")
    zoo("quantize", "blocks", "--scheme", "nf4", "--no-eval")
    zoo("push", "blocks@nf4", "--repo", "acme/blocks-nf4")
    code = """
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("acme/blocks-nf4", device_map="cpu")
print(type(model.model.layers[0].self_attn.q_proj.weight).__name__)
"""
    assert run_elsewhere(hub, tmp_path, code).strip() == "Params4bit"
    card = api(hub).model_info("acme/blocks-nf4").card_data
    assert card.get("base_model") is None  # blocks has no Hub id: nothing is invented
    assert "quantized" in card.tags and "nf4" in card.tags


def test_one_folder_of_a_repo_pulls_alone(hub, base_repo, models, tmp_path, monkeypatch):
    """A repo of several adapters, or of a run's checkpoints, with an adapter at its top too:
    --subfolder (or the folder's address) pulls that folder's adapter, never the top's,
    downloading nothing else; a repo with nothing at its top names its folders."""
    from safetensors.torch import load_file

    repo = tmp_path / "runs"
    for folder, seed in (("", 1), ("french", 2), ("runs/checkpoint-2", 3)):
        shutil.copytree(models.lora(f"runs-{seed}", seed=seed), repo / folder,
                        dirs_exist_ok=True)
    upload(hub, "someone/Runs", repo)
    homes = {}
    for machine in ("a", "b"):
        homes[machine] = tmp_path / f"home-{machine}"
        monkeypatch.setenv("ZOO_HOME", str(homes[machine]))
        zoo("pull", BASE_REPO)
    monkeypatch.setenv("ZOO_HOME", str(homes["a"]))
    hub.downloads.clear()
    result = zoo("pull", "someone/Runs", "--subfolder", "french", "--base", "someorg/tiny-llama")
    assert "pulled someone/runs-french (lora) from someone/Runs (folder french)" in result.stdout
    fetched = {f for m, f, _ in hub.downloads if m == "GET" and "/resolve/" not in f}
    assert fetched and all(f.startswith("someone/Runs/french/") for f in fetched), fetched
    entry = zoo_json("show", "someone/runs-french")
    stored = homes["a"] / entry["path"]
    for name, tensor in load_file(repo / "french" / "adapter_model.safetensors").items():
        assert torch.equal(load_file(stored / "adapter_model.safetensors")[name], tensor)
    assert entry["source"]["subfolder"] == entry["hub"]["subfolder"] == "french"
    assert "(folder french)" in zoo("versions", "someone/runs-french").stdout

    # the address of a folder, or of a file's page in it; the top alone without one
    address = f"{hub.url}/someone/Runs/tree/main/runs/checkpoint-2"
    result = zoo("pull", address, ok=False)  # its config names no base: the error names it
    assert "cannot tell which base someone/Runs (folder runs/checkpoint-2) belongs to" in \
        result.stderr
    assert "pulled someone/runs-runs-checkpoint-2" in zoo(
        "pull", address, "--base", "someorg/tiny-llama").stdout
    assert "already in the zoo" in zoo(
        "pull", f"{hub.url}/someone/Runs/blob/main/french/adapter_config.json",
        "--base", "someorg/tiny-llama").stdout
    zoo("pull", "someone/Runs", "--base", "someorg/tiny-llama")
    hashes = {n: zoo_json("show", n)["content_hash"] for n in (
        "someone/runs", "someone/runs-french", "someone/runs-runs-checkpoint-2")}
    assert len(set(hashes.values())) == 3

    # what is refused registers nothing
    before = (homes["a"] / "registry.json").read_text()
    for args, said in (
            (["--subfolder", "../french"], "is not a folder of a repo"),
            (["--subfolder", "german"], "someone/Runs has no folder 'german'"),
    ):
        result = zoo("pull", "someone/Runs", *args, ok=False)
        assert result.exit_code == 1 and said in result.stderr, result.stderr
    result = zoo("pull", f"{hub.url}/someone/Runs/tree/main/runs", "--subfolder", "french",
                 ok=False)
    assert result.exit_code == 1 and "differ" in result.stderr
    result = zoo("pull", f"{hub.url}/someone/Runs/tree/main/runs", ok=False)
    assert result.exit_code == 1 and "(folder runs) holds no adapter or model at its top, " \
        "but in folders: checkpoint-2" in result.stderr
    assert "--subfolder checkpoint-2" in result.stderr
    assert (homes["a"] / "registry.json").read_text() == before

    # a catalog index carries the folder: another machine pulls the same adapter
    zoo("sync", "--repo", "someone/index")
    monkeypatch.setenv("ZOO_HOME", str(homes["b"]))
    synced = zoo("sync", "--repo", "someone/index").stdout
    assert "pulled: " in synced and "someone/runs-french" in synced, synced
    assert zoo_json("show", "someone/runs-french")["content_hash"] == hashes[
        "someone/runs-french"]


def test_a_repo_of_folders_only_names_them(hub, models, tmp_path, zoo_home):
    repo = tmp_path / "many"
    for folder in ("b-adapter", "a-adapter"):
        shutil.copytree(models.lora("plain"), repo / folder)
    (repo / "README.md").write_text("# several adapters\n")
    upload(hub, "someone/many", repo)
    result = zoo("pull", "someone/many", ok=False)
    assert result.exit_code == 1
    assert "someone/many holds no adapter or model at its top, but in folders: a-adapter, " \
           "b-adapter; nothing was registered" in result.stderr
    assert "--subfolder a-adapter" in result.stderr


def test_a_gguf_repo_becomes_a_16_bit_base(hub, smollm2_home, tmp_path, zoo_home):
    """Bases are often published as GGUF files only: zoo builds a bf16 checkpoint from the
    one picked (its page's address picks it too) and downloads nothing else; gguf's own
    dequantization is the reference for the weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from zoo.catalog.registry import Registry
    from zoo.catalog.shipped import shipped_catalog
    from zoo.models.embedded import gguf_file

    packaged = gguf_file(shipped_catalog().base("smollm2-135m-instruct").source)
    repo = tmp_path / "gguf-repo"
    repo.mkdir()
    os.link(packaged, repo / packaged.name)
    for other in ("SmolLM2-135M-Instruct.F16.gguf", "mmproj-SmolLM2.gguf",
                  "SmolLM2-big-00001-of-00002.gguf"):
        (repo / other).write_bytes(b"GGUF not this one")
    upload(hub, "SomeOrg/SmolLM2-GGUF", repo)

    result = zoo("pull", "SomeOrg/SmolLM2-GGUF", ok=False)
    assert result.exit_code == 1 and "SomeOrg/SmolLM2-GGUF holds 2 GGUF files: " \
        f"SmolLM2-135M-Instruct.F16.gguf, {packaged.name}; nothing was registered" in result.stderr
    assert "--gguf FILE" in result.stderr
    result = zoo("pull", "SomeOrg/SmolLM2-GGUF", "--gguf", "SmolLM2-big-00001-of-00002.gguf",
                 ok=False)
    assert result.exit_code == 1 and "one part of a split GGUF file" in result.stderr
    assert not (zoo_home / "registry.json").exists() or zoo_json("list") == []

    hub.downloads.clear()
    result = zoo("pull", f"{hub.url}/SomeOrg/SmolLM2-GGUF/blob/main/{packaged.name}")
    assert "pulled someorg/smollm2-gguf (base) from SomeOrg/SmolLM2-GGUF" in result.stdout
    assert {f.rpartition("/")[2] for m, f, _ in hub.downloads if m == "GET" and
            f.endswith(".gguf")} == {packaged.name}
    entry = zoo_json("show", "someorg/smollm2-gguf")
    assert entry["hub"]["gguf"] == packaged.name and entry["hub"]["repo"] == "SomeOrg/SmolLM2-GGUF"
    assert entry["source"]["converted"].startswith(f"{packaged.name} -> bfloat16 safetensors")
    embedded = Registry(smollm2_home).load().base("smollm2-135m-instruct")
    assert entry["content_hash"] == embedded.content_hash  # built as the embedded base is
    # what zoo pushes of its adapters must not name the GGUF repo: from_pretrained cannot
    # load it by its id
    assert Registry(zoo_home).load().base("someorg/smollm2-gguf").hub_id is None
    weights = load_file(zoo_home / entry["path"] / "model.safetensors")
    reader = GGUFReader(packaged)
    for gguf_name, name in (("token_embd.weight", "model.embed_tokens.weight"),
                            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")):
        tensor = next(t for t in reader.tensors if t.name == gguf_name)
        reference = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type))
        assert torch.equal(weights[name], reference.to(torch.bfloat16)), name
    again = zoo("pull", "SomeOrg/SmolLM2-GGUF", "--gguf", packaged.name)
    assert "already in the zoo" in again.stdout
    assert "built from the same file of the same commit" in again.stderr  # not built again



@pytest.mark.parametrize("names, kind, files", [
    ({"adapter_config.json", "adapter_model.safetensors", "x.gguf"}, "adapter",
     ["adapter_config.json", "adapter_model.safetensors"]),
    ({"config.json", "model.safetensors", "tokenizer.json", "m.Q8_0.gguf"}, "model",
     ["config.json", "tokenizer.json", "model.safetensors"]),
    # a GGUF repo with the original's config beside it, a projector, a split file
    ({"config.json", "m.Q8_0.gguf", "mmproj-m.gguf", "big-00001-of-00002.gguf"}, "gguf",
     ["m.Q8_0.gguf"]),
    ({"sub/m.gguf", "m.F16.gguf", "README.md"}, "gguf", ["m.F16.gguf"]),
])
def test_what_a_repo_is_is_read_from_its_file_names(names, kind, files):
    from zoo.hub.repos import plan_fetch

    plan = plan_fetch("o/r", names)
    assert (plan.kind, plan.files) == (kind, files)
