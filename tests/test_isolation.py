"""Tenants and Hubs are untrusted: what they send is data, never code, paths or names.

The catalog side of docs/SECURITY.md (the serving side is in test_middleware.py and
test_serve.py; the Hub side in test_hub.py). Each test names the item of issue 10 it
closes.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from tests.helpers import zoo, zoo_json
from zoo.catalog.home import validate_name
from zoo.core.files import read_safetensors_header
from zoo.errors import FormatError, InvalidName

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def tiny(models):
    zoo("add", models.llama, "--name", "tiny")
    return models


def copy_adapter(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    dst.mkdir(parents=True)
    data = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**data, **(config or {})}))
    weights = load_file(src / WEIGHTS)
    if tensors:
        tensors(weights)
    save_file(weights, dst / WEIGHTS)
    return dst


# 3. names x and x/y never share storage ---------------------------------------------

def test_a_name_and_names_under_it_cannot_both_exist(tiny, zoo_home):
    zoo("add", tiny.lora("plain"), "--name", "team/a", "--base", "tiny")
    result = zoo("add", tiny.lora("plain"), "--name", "team", "--base", "tiny", ok=False)
    assert result.exit_code == 1 and "share storage with team/a" in result.stderr
    zoo("add", tiny.lora("plain"), "--name", "org", "--base", "tiny")
    result = zoo("add", tiny.lora("plain"), "--name", "org/b", "--base", "tiny", ok=False)
    assert "share storage with org" in result.stderr
    zoo("rm", "org")
    assert zoo("verify").exit_code == 0
    assert {e["name"] for e in zoo_json("list")} == {"tiny", "team/a"}
    assert (zoo_home / "adapters/team/a" / WEIGHTS).exists()


# 4. symbolic links are never followed out of an adapter folder -------------------------

def test_an_adapter_folder_with_a_symlink_is_refused(tiny, tmp_path, zoo_home):
    secret = tmp_path / "secret.txt"
    secret.write_text("the other tenant's key")
    folder = copy_adapter(tiny.lora("plain"), tmp_path / "with-link")
    (folder / "notes.txt").symlink_to(secret)
    result = zoo("add", folder, "--name", "acme/x", "--base", "tiny", ok=False)
    assert result.exit_code == 1 and "symbolic links (notes.txt)" in result.stderr
    assert not (zoo_home / "adapters").exists() or not any((zoo_home / "adapters").rglob("*.txt"))


def test_a_stored_file_that_became_a_link_counts_as_changed(tiny, tmp_path, zoo_home):
    """Even a link to identical bytes: the registry vouches for the files it stored."""
    from zoo.catalog.registry import Registry
    from zoo.serve.policy import ServePolicy

    zoo("add", tiny.lora("plain"), "--name", "acme/x", "--base", "tiny")
    stored = zoo_home / "adapters/acme/x" / WEIGHTS
    copy = tmp_path / "elsewhere.safetensors"
    copy.write_bytes(stored.read_bytes())
    stored.unlink()
    stored.symlink_to(copy)
    result = zoo("verify", "acme/x", ok=False)
    assert result.exit_code == 1 and WEIGHTS in result.stdout + result.stderr
    decision = ServePolicy(Registry(zoo_home), "tiny", 16).adapter("acme/x")
    assert decision.status == 422 and WEIGHTS in decision.message


def test_non_finite_alphas_are_refused(tiny, tmp_path, zoo_home):
    for i, alpha in enumerate((float("nan"), float("inf"), -float("inf"))):
        folder = copy_adapter(tiny.lora("plain"), tmp_path / f"alpha{i}",
                              config={"lora_alpha": alpha})
        result = zoo("add", folder, "--name", f"acme/a{i}", "--base", "tiny", ok=False)
        assert result.exit_code == 1 and "alpha" in result.stderr, result.stderr
    patterned = copy_adapter(tiny.lora("plain"), tmp_path / "pattern",
                             config={"alpha_pattern": {"q_proj": float("nan")}})
    result = zoo("add", patterned, "--name", "acme/p", "--base", "tiny", ok=False)
    assert result.exit_code == 1 and "alpha" in result.stderr, result.stderr
    assert not (zoo_home / "adapters").exists() or not any((zoo_home / "adapters").iterdir())


def test_a_deeply_nested_adapter_config_is_a_format_error(tiny, tmp_path, zoo_home):
    folder = copy_adapter(tiny.lora("plain"), tmp_path / "deep")
    config = json.loads((folder / "adapter_config.json").read_text())
    text = json.dumps(config)[:-1] + ', "junk": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (folder / "adapter_config.json").write_text(text)
    result = zoo("add", folder, "--name", "acme/deep", "--base", "tiny", ok=False)
    assert result.exit_code == 1 and result.stderr.startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr


# 7. rm deletes under the lock: an add of the same name in between keeps its files ------

def test_rm_racing_an_add_of_the_same_name_keeps_the_new_files(tiny, zoo_home, monkeypatch):
    """Whatever runs between rm's registry write and its deleting of files (here an add
    of the same name, injected at that moment) keeps its files."""
    import zoo.catalog.store as store

    zoo("add", tiny.lora("plain"), "--name", "acme/x", "--base", "tiny")
    real_rmtree = store.shutil.rmtree
    injected = []

    def rmtree_after_a_racing_add(path, *args, **kwargs):
        if not injected:
            injected.append(True)
            zoo("add", tiny.lora("second", r=2, lora_alpha=4, seed=9), "--name", "acme/x",
                "--base", "tiny")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(store.shutil, "rmtree", rmtree_after_a_racing_add)
    zoo("rm", "acme/x")
    assert injected
    assert zoo_json("show", "acme/x")["rank"] == 2
    assert zoo("verify").exit_code == 0


def test_adds_and_removes_of_one_name_in_any_order_leave_a_verified_registry(tiny, zoo_home):
    adapter = str(tiny.lora("plain"))
    script = ("import sys\nfrom zoo.cli import main\nfor i in range(6):\n"
              "    for args in (['add', sys.argv[1], '--name', 'acme/x', '--base', 'tiny'],"
              " ['rm', 'acme/x']):\n"
              "        sys.argv = ['zoo', *args]\n"
              "        try:\n            main()\n        except SystemExit:\n            pass\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, adapter], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(4)]
    for proc in procs:
        proc.wait(timeout=300)
    assert zoo("verify").exit_code == 0
    names = {e["name"] for e in zoo_json("list")}
    stored = zoo_home / "adapters/acme/x"
    assert ("acme/x" in names) == stored.exists()


# 8. patterns are matched as names, never compiled ---------------------------------------

def test_a_regex_in_rank_pattern_is_refused_at_once(tiny, tmp_path):
    folder = copy_adapter(tiny.lora("plain"), tmp_path / "evil",
                          config={"rank_pattern": {"(.*.*.*.*.*.*)*X": 4}})
    started = time.monotonic()
    result = zoo("add", folder, "--name", "acme/evil", "--base", "tiny", ok=False)
    assert time.monotonic() - started < 5
    assert result.exit_code == 1 and "rank_pattern key" in result.stderr


def test_plain_rank_pattern_keys_still_match_dotted_suffixes():
    from zoo.models.adapters import match_pattern

    module = "model.layers.1.self_attn.q_proj"
    assert match_pattern({"q_proj": 4}, module) == 4
    assert match_pattern({"layers.1.self_attn.q_proj": 2}, module) == 2
    assert match_pattern({"k_proj": 4, "proj": 1}, module) is None  # whole parts only
    assert match_pattern({"1.self_attn.q_proj": 3}, module) == 3


# 9. smaller items ---------------------------------------------------------------------

def test_a_name_ending_in_a_newline_is_refused():
    for bad in ("acme/x\n", "acme\n/x", "x\n", "base@nf4\n"):
        with pytest.raises(InvalidName):
            validate_name(bad) if "@" not in bad else __import__(
                "zoo.catalog.home", fromlist=["split_variant"]).split_variant(bad)


def test_nan_weights_and_rank_zero_are_refused_at_registration(tiny, tmp_path, zoo_home):
    def poison(weights):
        key = next(k for k in weights if k.endswith("lora_B.weight"))
        weights[key] = weights[key].copy()
        weights[key].flat[0] = float("nan")

    nan = copy_adapter(tiny.lora("plain"), tmp_path / "nan", tensors=poison)
    result = zoo("add", nan, "--name", "acme/nan", "--base", "tiny", ok=False)
    assert result.exit_code == 1 and "NaN or infinite" in result.stderr
    zero = copy_adapter(tiny.lora("plain"), tmp_path / "zero", config={"r": 0})
    result = zoo("add", zero, "--name", "acme/zero", "--base", "tiny", ok=False)
    assert result.exit_code == 1 and "rank must be 1 or more" in result.stderr
    assert not (zoo_home / "registry.json").exists() or \
        {e["name"] for e in zoo_json("list")} == {"tiny"}


def test_a_deeply_nested_safetensors_header_is_a_format_error(tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(FormatError, match="nests too deep|not a valid"):
        read_safetensors_header(path)
