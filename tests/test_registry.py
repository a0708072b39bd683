"""The registry and the catalog commands: add, list, show, verify, rm."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import check_registry
from tests.helpers import zoo, zoo_json, zoo_process
from zoo.catalog.home import validate_name
from zoo.errors import InvalidName


@pytest.fixture
def tiny(models):
    zoo("add", models.llama, "--name", "tiny-llama")
    return models


@pytest.mark.parametrize("name", ["a", "acme/pirate-v2", "x.y_z-1", "0abc"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "/abs/path", "a/../b", "UPPER", "a b", "a/b/c",
                                  ".hidden", "a/", "x" * 97, "ünï"])
def test_invalid_names_are_refused(name):
    with pytest.raises(InvalidName):
        validate_name(name)


def test_add_a_base_records_its_architecture(models, zoo_home):
    zoo("add", models.llama, "--name", "tiny-llama")
    base = zoo_json("show", "tiny-llama")
    assert base["kind"] == "base"
    assert base["architecture"] == "LlamaForCausalLM"
    assert (base["hidden_size"], base["num_layers"], base["vocab_size"]) == (32, 2, 128)
    assert base["dtype"] == "bfloat16"
    # independent count: the model's own parameters (untied embeddings)
    from transformers import AutoModelForCausalLM
    assert base["parameters"] == AutoModelForCausalLM.from_pretrained(models.llama).num_parameters()
    assert base["path"].startswith(str(zoo_home))
    assert base["content_hash"].startswith("sha256:")


def test_add_lora_inspects_the_files(tiny, zoo_home):
    adapter = tiny.lora("plain")
    zoo("add", adapter, "--name", "acme/plain", "--base", "tiny-llama")
    entry = zoo_json("show", "acme/plain")
    assert entry["kind"] == "lora"
    assert entry["base"] == "tiny-llama"
    assert entry["base_hash"] == zoo_json("show", "tiny-llama")["content_hash"]
    assert (entry["rank"], entry["alpha"]) == (4, 8.0)
    assert entry["target_modules"] == ["q_proj", "v_proj"]
    # 2 layers x (q: 4*32 + 32*4, v: 4*32 + 16*4)
    assert entry["trainable_params"] == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    base_params = zoo_json("show", "tiny-llama")["parameters"]
    assert entry["percent_of_base"] == pytest.approx(100 * entry["trainable_params"] / base_params,
                                                     abs=0.5e-4)  # written to 4 decimals
    assert entry["servable"] is True and entry["servable_reason"] is None
    stored = zoo_home / "adapters" / "acme" / "plain"
    assert entry["path"] == str(stored)
    import hashlib
    for name, info in entry["files"].items():
        digest = hashlib.sha256((stored / name).read_bytes()).hexdigest()
        assert info == {"sha256": f"sha256:{digest}", "size": (stored / name).stat().st_size}
    assert set(entry["files"]) == {"adapter_config.json", "adapter_model.safetensors",
                                   "README.md"}


def test_base_is_found_from_the_adapter_config(tiny):
    adapter = tiny.lora("named")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    zoo("add", adapter, "--name", "named")
    assert zoo_json("show", "named")["base"] == "tiny-llama"


def test_unknown_base_asks_for_base(tiny):
    result = zoo("add", tiny.lora("plain"), "--name", "x", ok=False)
    assert result.exit_code == 1
    assert "--base" in result.stderr


@pytest.mark.parametrize("config, field, expected", [
    (dict(use_rslora=True), "use_rslora", True),
    (dict(rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 16}), "rank_pattern", {"v_proj": 2}),
])
def test_lora_variants_are_recorded(tiny, config, field, expected):
    zoo("add", tiny.lora(field, **config), "--name", field.replace("_", "-"), "--base", "tiny-llama")
    entry = zoo_json("show", field.replace("_", "-"))
    assert entry["lora"][field] == expected
    assert entry["servable"] is True


def test_rank_pattern_changes_the_parameter_count(tiny):
    zoo("add", tiny.lora("pattern", rank_pattern={"v_proj": 2}), "--name", "p", "--base",
        "tiny-llama")
    entry = zoo_json("show", "p")
    assert entry["trainable_params"] == 2 * ((4 * 32 + 32 * 4) + (2 * 32 + 16 * 2))
    assert entry["lora"]["max_rank"] == 4


def test_gpt2_fan_in_fan_out(models):
    zoo("add", models.gpt2, "--name", "tiny-gpt2")
    adapter = models.lora("gpt2", base=models.gpt2, target_modules=["c_attn"],
                          fan_in_fan_out=True)
    zoo("add", adapter, "--name", "g", "--base", "tiny-gpt2")
    entry = zoo_json("show", "g")
    assert entry["lora"]["fan_in_fan_out"] is True
    assert entry["target_modules"] == ["c_attn"]
    assert entry["servable"] is False
    assert "GPT2LMHeadModel" in entry["servable_reason"]


@pytest.mark.parametrize("config, reason", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(lora_bias=True), "bias"),
])
def test_unservable_adapters_are_accepted_with_a_reason(tiny, config, reason):
    tag = reason.lower().replace("_", "-")
    zoo("add", tiny.lora(tag, **config), "--name", tag, "--base", "tiny-llama")
    entry = zoo_json("show", tag)
    assert entry["servable"] is False
    assert reason in entry["servable_reason"]


def test_bottleneck_adapter(tiny):
    zoo("add", tiny.bottleneck(m=4), "--name", "bn", "--base", "tiny-llama")
    entry = zoo_json("show", "bn")
    assert entry["kind"] == "bottleneck"
    m, d, modules = 4, 32, 2 * 2
    assert entry["bottleneck"]["modules"] == modules
    assert entry["trainable_params"] == modules * (2 * m * d + d + m)
    assert entry["servable"] is False and "bottleneck" in entry["servable_reason"]
    assert entry["alpha"] is None and entry["rank"] == m


def test_shape_mismatch_names_the_first_bad_tensor_and_registers_nothing(tiny, zoo_home):
    wrong = tiny.lora("wide", base=tiny.llama_wide)
    before = (zoo_home / "registry.json").read_text()
    result = zoo("add", wrong, "--name", "wrong", "--base", "tiny-llama", ok=False)
    assert result.exit_code == 1
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in result.stderr
    assert "[4, 48]" in result.stderr and "[4, 32]" in result.stderr
    assert "Traceback" not in result.output
    assert (zoo_home / "registry.json").read_text() == before
    assert not (zoo_home / "adapters" / "wrong").exists()
    assert list((zoo_home / "tmp").iterdir()) == []


def test_bottleneck_of_the_wrong_width_is_refused(models, zoo_home):
    zoo("add", models.llama_wide, "--name", "wide")
    result = zoo("add", models.bottleneck(), "--name", "bn", "--base", "wide", ok=False)
    assert result.exit_code == 1 and "layers.0.attention.down.weight" in result.stderr


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
     "not a valid safetensors file"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-100]), "truncated"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "missing"),
])
def test_damaged_adapters_get_one_clear_line(tiny, tmp_path, zoo_home, damage, message):
    adapter = tmp_path / "damaged"
    shutil.copytree(tiny.lora("plain"), adapter)
    damage(adapter)
    result = zoo("add", adapter, "--name", "damaged", "--base", "tiny-llama", ok=False)
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "damaged" not in zoo_json("list")[0]["name"]


def test_user_errors(tiny):
    cases = [
        (["add", "/does/not/exist", "--name", "x"], "not a directory"),
        (["show", "nope"], "no entry named 'nope'"),
        (["rm", "nope"], "no entry named 'nope'"),
        (["add", tiny.lora("plain"), "--name", "../evil", "--base", "tiny-llama"], "invalid name"),
        (["add", tiny.lora("plain"), "--name", "x", "--base", "nobase"], "no base named"),
        (["add", tiny.lora("plain"), "--name", "tiny-llama", "--base", "tiny-llama"],
         "already registered"),
    ]
    for args, message in cases:
        result = zoo(*args, ok=False)
        assert result.exit_code == 1, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output


def test_debug_variable_shows_the_traceback(tiny, monkeypatch):
    monkeypatch.setenv("ZOO_DEBUG", "1")
    result = zoo("show", "nope", ok=False)
    assert "Traceback" in result.stderr


def test_list_filters_and_json(tiny):
    zoo("add", tiny.lora("plain"), "--name", "a1", "--base", "tiny-llama")
    zoo("add", tiny.bottleneck(), "--name", "b1", "--base", "tiny-llama")
    zoo("add", tiny.gpt2, "--name", "tiny-gpt2")
    names = [e["name"] for e in zoo_json("list")]
    assert names == ["a1", "b1", "tiny-gpt2", "tiny-llama"]
    assert [e["name"] for e in zoo_json("list", "--kind", "bottleneck")] == ["b1"]
    assert [e["name"] for e in zoo_json("list", "--kind", "base")] == ["tiny-gpt2", "tiny-llama"]
    assert {e["name"] for e in zoo_json("list", "--base", "tiny-llama")} == {"a1", "b1", "tiny-llama"}
    for e in zoo_json("list"):
        assert {"name", "kind", "base"} <= set(e)
    table = zoo("list").stdout
    assert table.splitlines()[0].split() == ["NAME", "KIND", "BASE", "RANK", "PARAMS", "SERVABLE"]


def test_verify_reports_changed_files(tiny, zoo_home):
    zoo("add", tiny.lora("plain"), "--name", "v", "--base", "tiny-llama")
    assert zoo("verify").exit_code == 0
    stored = zoo_home / "adapters" / "v" / "adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    result = zoo("verify", ok=False)
    assert result.exit_code == 1
    assert "v: CHANGED adapter_model.safetensors" in result.stdout
    assert "tiny-llama: ok" in result.stdout
    assert zoo("verify", "tiny-llama").exit_code == 0


def _hash_in_a_new_process(path: Path, env: dict | None = None) -> str:
    """``file_hash`` in a process of its own that cannot hash: it answers from the
    persisted cache or fails."""
    import os

    code = ("import sys; from pathlib import Path; from zoo.catalog import integrity\n"
            "def refuse(path): raise SystemExit('hashed ' + str(path))\n"
            "integrity.sha256_file = refuse\n"
            "print(integrity.file_hash(Path(sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    return done.stdout.strip() or done.stderr.strip()


def test_a_files_hash_outlives_the_process_until_the_file_changes(tmp_path, monkeypatch):
    from zoo.catalog import integrity
    from zoo.core.files import sha256_file

    stored = tmp_path / "weights.bin"
    stored.write_bytes(b"x" * 1000)
    assert integrity.file_hash(stored) == sha256_file(stored)
    # written just now: within a file clock's tick of a write that would keep its stat
    assert _hash_in_a_new_process(stored) == f"hashed {stored}"
    monkeypatch.setattr(integrity, "SETTLED_NS", 0)  # as if it were old enough
    integrity.forget_hashes()
    assert integrity.file_hash(stored) == sha256_file(stored)
    assert _hash_in_a_new_process(stored) == sha256_file(stored)  # no hashing
    assert _hash_in_a_new_process(stored, {"ZOO_HASH_CACHE": "off"}) == f"hashed {stored}"
    stored.write_bytes(b"y" * 1000)  # same size, other bytes: a new stat
    assert _hash_in_a_new_process(stored) == f"hashed {stored}"


def test_verify_rereads_what_the_hash_cache_vouches_for(tiny, zoo_home, monkeypatch):
    """A disk that flips bits under an unchanged stat (made here by writing the registered
    hash into the cache for the changed file's stat): serving trusts the cache; ``zoo
    verify`` reads every byte, reports the file and mends the cache."""
    from zoo.catalog import integrity
    from zoo.catalog.registry import Registry

    monkeypatch.setattr(integrity, "SETTLED_NS", 0)
    zoo("add", tiny.lora("plain"), "--name", "v", "--base", "tiny-llama")
    entry = Registry(zoo_home).load().entries["v"]
    folder = zoo_home / entry.path
    stored = folder / "adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    integrity.forget_hashes()
    registered = entry.files["adapter_model.safetensors"]["sha256"]
    integrity._connection().execute("INSERT INTO hashes VALUES (?, ?, ?, ?, ?, ?)",
                                    (*integrity._stamp(stored.stat()), registered))
    assert integrity.changed_files(folder, entry.files) == []  # what a stat cache trusts
    result = zoo("verify", ok=False)
    assert "v: CHANGED adapter_model.safetensors" in result.stdout
    integrity._hashes.clear()
    assert integrity.changed_files(folder, entry.files) == ["adapter_model.safetensors"]


def test_rm_deletes_files_and_protects_used_bases(tiny, zoo_home):
    zoo("add", tiny.lora("plain"), "--name", "r", "--base", "tiny-llama")
    result = zoo("rm", "tiny-llama", ok=False)
    assert "still has adapters: r" in result.stderr
    zoo("rm", "r")
    assert not (zoo_home / "adapters" / "r").exists()
    zoo("rm", "tiny-llama")
    assert zoo_json("list") == []


def test_concurrent_adds_lose_nothing(tiny, zoo_home):
    adapter = tiny.lora("plain")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "zoo", "add", str(adapter), "--name", f"c{i}", "--base",
         "tiny-llama"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(16)]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    data = check_registry(zoo_home / "registry.json")
    assert {f"c{i}" for i in range(16)} <= set(data["entries"])
    assert zoo("verify").exit_code == 0


KILL_MID_WRITE = """
import builtins, os, signal, sys
import zoo.core.files

class DieHalfway:
    # a file whose first write stores half the text, then dies like kill -9
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *exc): return False
    def write(self, text):
        self.f.write(text[: len(text) // 2]); self.f.flush(); os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

def open_for_dying(path, mode="r", *args, **kwargs):
    f = builtins.open(path, mode, *args, **kwargs)
    return DieHalfway(f) if "w" in mode else f

zoo.core.files.open = open_for_dying
from zoo.cli import main
sys.argv = ["zoo"] + sys.argv[1:]
main()
"""


def test_killed_writer_leaves_the_previous_registry(tiny, zoo_home, tmp_path):
    zoo("add", tiny.lora("plain"), "--name", "kept", "--base", "tiny-llama")
    before = (zoo_home / "registry.json").read_text()
    script = tmp_path / "die.py"
    script.write_text(KILL_MID_WRITE)
    proc = subprocess.run([sys.executable, str(script), "add", str(tiny.lora("plain")),
                           "--name", "lost", "--base", "tiny-llama"], capture_output=True)
    assert proc.returncode == -9
    assert (zoo_home / "registry.json").read_text() == before
    check_registry(zoo_home / "registry.json")
    # the next writer works, and the dead writer's half-written files do not linger
    zoo("add", tiny.lora("plain"), "--name", "next", "--base", "tiny-llama")
    assert {e["name"] for e in zoo_json("list")} == {"kept", "next", "tiny-llama"}
    assert not list(zoo_home.glob(".registry.json.*.tmp"))
    assert not list((zoo_home / "tmp").iterdir())
    zoo("add", tiny.lora("plain"), "--name", "lost", "--base", "tiny-llama")
    assert zoo("verify").exit_code == 0


def test_help_and_list_do_not_import_torch(tiny):
    probe = ("import sys; from zoo.cli import main; sys.argv=['zoo'] + sys.argv[1:]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "heavy = [m for m in ('torch', 'transformers', 'vllm', 'peft') if m in sys.modules]\n"
             "print('HEAVY', heavy, file=sys.stderr)")
    for args in (["--help"], ["list"], ["list", "--json"], ["show", "tiny-llama"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
        assert "HEAVY []" in proc.stderr, (args, proc.stderr)


def test_console_script(tiny):
    proc = zoo_process("list", "--json")
    assert proc.returncode == 0
    assert [e["name"] for e in json.loads(proc.stdout)] == ["tiny-llama"]
    proc = zoo_process("show", "missing")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: no entry named 'missing'")
    assert proc.stderr.count("\n") == 1


def test_add_many_registers_a_folder_of_adapters_in_one_write(tiny, tmp_path, zoo_home):
    folder = tmp_path / "customers"
    folder.mkdir()
    for i in range(12):
        shutil.copytree(tiny.lora("plain"), folder / f"c{i:02d}")
    (folder / "broken").mkdir()  # no adapter inside
    shutil.copytree(tiny.lora("plain"), folder / "Bad Name")
    writes = []
    import zoo.catalog.registry as registry_module

    real = registry_module.write_bytes_atomic
    registry_module.write_bytes_atomic = lambda path, data: (writes.append(1), real(path, data))
    try:
        result = zoo("add", folder, "--many", "--prefix", "cust/", "--base", "tiny-llama",
                     ok=False)
    finally:
        registry_module.write_bytes_atomic = real
    assert result.exit_code == 1  # some were refused: one line each
    assert "added 12 adapters on tiny-llama, refused 2" in result.stdout
    assert "refused broken:" in result.stderr and "refused Bad Name:" in result.stderr
    assert len(writes) == 1
    names = {e["name"] for e in zoo_json("list")}
    assert {f"cust/c{i:02d}" for i in range(12)} <= names and len(names) == 13
    assert zoo("verify").exit_code == 0
    again = zoo("add", folder, "--many", "--prefix", "cust/", "--base", "tiny-llama", ok=False)
    assert "already registered" in again.stderr and "added 0 adapters" in again.stdout
    assert not list((zoo_home / "tmp").iterdir())


def test_pulling_a_present_shipped_adapter_again_is_a_no_op(tiny, zoo_home, tmp_path, monkeypatch):
    """A catalog recipe (here: train) already made in this home is not made again."""
    zoo("add", tiny.lora("plain"), "--name", "demo/x", "--base", "tiny-llama")
    entry = json.loads((zoo_home / "registry.json").read_text())["entries"]["demo/x"]
    shipped = {"schema_version": 1, "entries": {"demo/x": {
        **entry, "path": None, "source": {"type": "train", "data": "pirate.jsonl"}}}}
    (tmp_path / "catalog.json").write_text(json.dumps(shipped))
    monkeypatch.setenv("ZOO_CATALOG", str(tmp_path / "catalog.json"))
    result = zoo("pull", "demo/x")
    assert "already in the zoo (nothing to do)" in result.stdout


# The last release that wrote schema version 1 (stop 17); its zoo package is read from git.
RELEASE_BEFORE = "19336d0"


def previous_release(tmp_path: Path) -> dict:
    """The previous release's zoo package, extracted from git, as an environment that runs
    it (its ``import zoo`` finds that package first)."""
    import io
    import os
    import subprocess
    import tarfile

    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", RELEASE_BEFORE, "zoo"],
                             capture_output=True, check=True).stdout
    old = tmp_path / "previous-release"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(old, filter="data")
    return {**os.environ, "PYTHONPATH": str(old)}


def test_a_home_the_previous_release_wrote_is_upgraded_and_every_command_works(
        models, tmp_path, zoo_home):
    import subprocess
    import sys

    env = previous_release(tmp_path)

    def old_zoo(*args):
        return subprocess.run([sys.executable, "-m", "zoo", *map(str, args)], env=env, cwd=tmp_path,
                              capture_output=True, text=True)

    for args in (("add", models.llama, "--name", "tiny"),
                 ("add", models.lora("plain"), "--name", "acme/a", "--base", "tiny"),
                 ("add", models.bottleneck(), "--name", "acme/neck", "--base", "tiny")):
        done = old_zoo(*args)
        assert done.returncode == 0, done.stderr
    written = (zoo_home / "registry.json").read_text()
    assert json.loads(written)["schema_version"] == 1
    listed = zoo_json("list")  # the first open upgrades it
    assert {e["name"] for e in listed} == {"tiny", "acme/a", "acme/neck"}
    assert (zoo_home / "registry.json.v1").read_text() == written  # the old file kept
    data = check_registry(zoo_home / "registry.json")
    assert data["schema_version"] == 2 and data["entries"]["acme/a"]["version"] == 1
    assert zoo_json("show", "acme/a")["content_hash"] == json.loads(written)["entries"][
        "acme/a"]["content_hash"]
    assert zoo("verify").exit_code == 0
    zoo("merge", "--adapter", "acme/a", "--out", tmp_path / "merged", "--dtype", "fp32")
    zoo("add", models.lora("second", r=2, lora_alpha=4, seed=9), "--name", "acme/b",
        "--base", "tiny")
    zoo("generate", "hello", "--adapter", "acme/neck", "--max-tokens", "3")
    zoo("rm", "acme/a")
    check_registry(zoo_home / "registry.json")
    # the previous release refuses the new file with a clear line, and changes nothing
    before = (zoo_home / "registry.json").read_text()
    refused = old_zoo("list")
    assert refused.returncode == 1 and "schema_version 2" in refused.stderr
    assert (zoo_home / "registry.json").read_text() == before


def _edit_entry(home: Path, name: str, change) -> tuple[str, str]:
    """Hand-edit one entry of the home's registry; the text before and after."""
    registry = home / "registry.json"
    before = registry.read_text()
    data = json.loads(before)
    change(data["entries"][name])
    registry.write_text(json.dumps(data, indent=2))
    return before, registry.read_text()


@pytest.mark.parametrize("change, message, listed", [
    (lambda e: e.update(rank="8"), "rank is '8', not int", True),
    (lambda e: e.update(servable="yes"), "servable is 'yes', not bool", True),
    (lambda e: e.update(trainable_params=True), "trainable_params is True, not int", True),
    (lambda e: e.update(kind="adapter"), "kind 'adapter' is not one of", True),
    (lambda e: e.pop("base"), "base is missing", True),
    (lambda e: e.update(target_modules="q_proj"), "target_modules is 'q_proj', not list[str]",
     False),
    (lambda e: e["lora"].update(use_dora="no"), "lora.use_dora is 'no', not bool", False),
    (lambda e: e["files"]["adapter_config.json"].pop("size"), "files is {", False),
    (lambda e: e.update(lora=[]), "lora is [], not an object", False),
    (lambda e: e.update(canary={"version": 2}), "canary is {'version': 2}", False),
    (lambda e: e.update(name="y"), "its name field is 'y'", True),
    (lambda e: e.update(rank_pattern={}), "rank_pattern is not a field zoo knows", False),
    (lambda e: e["lora"].update({"\n": None}), "lora.'\\n' is not a field zoo knows", False),
])
def test_a_hand_edited_entry_gets_one_clear_line_and_nothing_is_written(
        tiny, zoo_home, change, message, listed):
    """A registry edited by hand is input like any other: every command that reads the
    entry names the field, and nothing is written (it once crashed `zoo list` with
    "unexpected KeyError: 'yes'" and `zoo show` printed `rank: 8` from "8")."""
    zoo("add", tiny.lora("plain"), "--name", "x", "--base", "tiny-llama")
    before, edited = _edit_entry(zoo_home, "x", change)
    commands = [["show", "x"], ["show", "x", "--json"], ["versions", "x"], ["rm", "x"],
                ["verify"], ["add", tiny.lora("plain"), "--name", "x", "--base", "tiny-llama",
                             "--new-version"]]
    for args in commands + ([["list"], ["list", "--json"]] if listed else []):
        result = zoo(*args, ok=False)
        assert result.exit_code == 1, (args, result.output)
        assert f"registry entry 'x' is malformed: {message}" in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1
    names = [line.split()[0] for line in zoo("list", ok=False).stdout.splitlines()]
    # zoo list reads only the fields it shows, without making records; it lists the rest
    assert names == (["NAME", "tiny-llama"] if listed else ["NAME", "tiny-llama", "x"])
    listing = json.loads(zoo("list", "--json", ok=False).stdout)
    assert [e["name"] for e in listing] == (["tiny-llama"] if listed else ["tiny-llama", "x"])
    assert (zoo_home / "registry.json").read_text() == edited
    assert (zoo_home / "adapters" / "x").is_dir()
    (zoo_home / "registry.json").write_text(before)  # the schema check at teardown
    zoo("rm", "x")


def test_rm_never_deletes_a_stored_path_outside_the_home(tiny, zoo_home, tmp_path):
    """`zoo rm` deletes what an entry's path names: a path edited to leave the home
    (absolute, or through ..) is refused, not followed."""
    zoo("add", tiny.lora("plain"), "--name", "x", "--base", "tiny-llama")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for path in (str(precious), "adapters/../../precious"):
        before, _ = _edit_entry(zoo_home, "x", lambda e, p=path: e.update(path=p))
        result = zoo("rm", "x", ok=False)
        assert f"path {path!r} is not inside the home" in result.stderr
        assert (precious / "thesis.tex").read_text() == "years of work"
        (zoo_home / "registry.json").write_text(before)
    zoo("rm", "x")


def test_a_reader_that_leaves_early_ends_zoo_quietly(tiny):
    """`zoo show NAME | head -1` once ended in "unexpected BrokenPipeError ... report it"."""
    exe = Path(sys.executable).with_name("zoo")
    proc = subprocess.Popen([str(exe), "show", "tiny-llama"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before zoo writes its first line (its start takes a tenth of a second)
    stderr = proc.stderr.read()
    assert proc.wait() == 141, stderr  # 128 + SIGPIPE, as `yes | head -1` ends `yes`
    assert stderr == b""


def test_a_server_and_its_pages_leave_a_malformed_entry_out_and_serve_the_rest(tiny, zoo_home):
    """One entry edited by hand must not stop a running server, or its pages, for everyone:
    it is left out (the operator's log and the catalog page say why), the rest are served."""
    from zoo.catalog.registry import Registry
    from zoo.serve.policy import ServePolicy
    from zoo.ui import pages

    zoo("add", tiny.lora("plain"), "--name", "good", "--base", "tiny-llama")
    zoo("add", tiny.lora("second", r=2, lora_alpha=4, seed=9), "--name", "bad",
        "--base", "tiny-llama")
    before, _ = _edit_entry(zoo_home, "bad", lambda e: e.update(rank="8"))
    policy = ServePolicy(Registry(zoo_home), "tiny-llama", 16)
    assert [a.name for a in policy.served_adapters()] == ["good"]
    assert list(policy.served_versions()) == ["good:v1"]
    assert policy.adapter("good").status == 200
    refused = policy.adapter("bad")
    assert refused.status == 500 and "malformed" in refused.message
    assert "rank" not in refused.message  # the registry's detail is for the operator's log
    html = pages.catalog_page(Registry(zoo_home), pages.Viewer(None, None), [])
    assert 'href="/zoo/ui/entry/good"' in html and 'href="/zoo/ui/entry/bad"' not in html
    assert "Malformed in registry.json" in html and "bad (rank is &#x27;8&#x27;, not int)" in html
    tenant = pages.catalog_page(Registry(zoo_home), pages.Viewer("acme", ("good",)), [])
    assert "Malformed" not in tenant  # another tenant's entry, even its name, is not shown
    (zoo_home / "registry.json").write_text(before)


def test_zoo_serve_starts_without_an_adapter_it_cannot_read_and_says_why(tiny, zoo_home):
    """`zoo serve` refused to start for everyone over one hand-edited adapter entry, and
    crashed on an adapter without files in this zoo (a TypeError), or on another version
    of one whose rank is past vLLM's limit (a ValueError). Now each is left out, on a line
    that says why, or refused when asked for."""
    from zoo.catalog.registry import Registry
    from zoo.serve.launch import ServeOptions, describe, plan_serve

    zoo("add", tiny.lora("plain"), "--name", "good", "--base", "tiny-llama")
    for name in ("bad", "gone", "wide"):
        zoo("add", tiny.lora("second", r=2, lora_alpha=4, seed=9), "--name", name,
            "--base", "tiny-llama")
    zoo("add", tiny.lora("plain"), "--name", "wide", "--base", "tiny-llama", "--new-version")
    before, _ = _edit_entry(zoo_home, "bad", lambda e: e.update(rank="8"))
    _edit_entry(zoo_home, "gone", lambda e: e.update(path=None))
    _edit_entry(zoo_home, "wide", lambda e: e["versions"]["2"]["lora"].update(max_rank=513))
    options = ServeOptions(quantization="none")
    plan = plan_serve(options, Registry(zoo_home))
    assert [a.name for a in plan.adapters] == ["good", "wide"]
    assert plan.max_lora_rank == 16  # the rank-513 version is refused when asked for
    lines = describe(plan, options)
    assert "  left out bad: its registry entry is malformed: rank is '8', not int" in lines
    assert "  left out gone: its files are not in this zoo ('zoo pull gone')" in lines
    (zoo_home / "registry.json").write_text(before)


def test_many_of_one_adapter_folder_says_so(tiny):
    """`zoo add ADAPTER --many` (one adapter, not a folder of them) said "added 0 adapters"
    and succeeded."""
    result = zoo("add", tiny.lora("plain"), "--many", "--base", "tiny-llama", ok=False)
    assert result.exit_code == 1 and "holds no adapter folders" in result.stderr
    assert "drop --many" in result.stderr


def test_the_records_checks_and_the_schema_agree_on_the_shapes_they_both_name():
    """The records' own checks and the JSON Schema must not drift apart."""
    from tests.conftest import SCHEMA
    from zoo.core.records import (
        ADAPTER_KINDS,
        BASE_KINDS,
        SOURCE_TYPES,
        AdapterEntry,
        BaseEntry,
        Canary,
        Evaluation,
        FileFacts,
    )

    defs = SCHEMA["$defs"]
    assert tuple(defs["source"]["properties"]["type"]["enum"]) == SOURCE_TYPES
    assert tuple(defs["base"]["properties"]["kind"]["enum"]) == BASE_KINDS
    assert tuple(defs["adapter"]["properties"]["kind"]["enum"]) == ADAPTER_KINDS
    file_facts = defs["files"]["additionalProperties"]
    assert set(file_facts["required"]) == set(FileFacts.__annotations__)
    evaluation = defs["evaluations"]["additionalProperties"]
    assert set(evaluation["required"]) == set(Evaluation.__annotations__)
    canary = defs["adapter"]["properties"]["canary"]
    assert set(canary["required"]) == set(Canary.__annotations__)
    for record, schema in ((BaseEntry, defs["base"]), (AdapterEntry, defs["adapter"])):
        assert set(schema["properties"]) == {f for f in record.__dataclass_fields__}, record
