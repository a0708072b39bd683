"""zoo push / pull / sync against a local Hub double, through the real huggingface_hub client."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import zoo, zoo_json
from zoo.testing.hub import HubServer

WRITE, READ = "hf_writer_token_0001", "hf_reader_token_0001"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = HubServer(tmp_path / "hub-root", write_tokens=[WRITE], read_tokens=[READ]).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", WRITE)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.shutdown()


@pytest.fixture
def homes(tmp_path, models, monkeypatch):
    """Two zoo homes on two 'machines', each with the same tiny base."""
    def use(which: str) -> Path:
        home = tmp_path / f"home-{which}"
        monkeypatch.setenv("ZOO_HOME", str(home))
        return home

    for which in ("a", "b"):
        use(which)
        zoo("add", models.llama, "--name", "tiny")
    use("a")
    return use


def commits(hub: HubServer, repo: str, kind: str = "models") -> int:
    return len(list((hub.store.root / kind / repo / "commits").iterdir()))


def test_round_trip(hub, homes, models, tmp_path):
    zoo("add", models.lora("plain"), "--name", "acme/plain", "--base", "tiny")
    result = zoo("push", "acme/plain")
    assert "pushed acme/plain to acme/plain" in result.stdout
    pushed = zoo_json("show", "acme/plain")
    assert pushed["hub"]["repo"] == "acme/plain" and len(pushed["hub"]["commit"]) == 40
    # the weights went through the Git LFS protocol, as real pushes of weights do
    assert hub.lfs_batches >= 1 and any(u.startswith("acme/plain:") for u in hub.lfs_uploads)
    card = (Path(pushed["path"]) / "README.md").read_text()
    # the base has no Hub id: no base_model is invented for it (the Hub links Hub ids only)
    assert "base_model" not in card and "library_name: peft" in card and "- zoo" in card
    assert "pipeline_tag: text-generation" in card and "http" not in card
    assert "| rank | 4 |" in card

    homes("b")
    zoo("pull", "acme/plain")
    pulled = zoo_json("show", "acme/plain")
    assert pulled["content_hash"] == pushed["content_hash"]
    assert pulled["files"] == pushed["files"]
    assert pulled["hub"]["commit"] == pushed["hub"]["commit"]
    assert pulled["kind"] == "lora" and pulled["base"] == "tiny"
    out_b = zoo("generate", "hello", "--adapter", "acme/plain", "--max-tokens", "6").stdout
    homes("a")
    out_a = zoo("generate", "hello", "--adapter", "acme/plain", "--max-tokens", "6").stdout
    assert out_a == out_b
    assert "already in the zoo" in zoo("pull", "acme/plain").stdout


def test_manifest_lists_every_file(hub, homes, models):
    zoo("add", models.lora("plain"), "--name", "acme/plain", "--base", "tiny")
    zoo("push", "acme/plain", "--private")
    from huggingface_hub import hf_hub_download
    manifest = json.loads(Path(hf_hub_download("acme/plain", "zoo.json", endpoint=hub.url,
                                               token=WRITE, cache_dir=hub.store.root / "c")
                               ).read_text())
    entry = zoo_json("show", "acme/plain")
    assert manifest["files"] == entry["files"]
    assert manifest["entry"]["name"] == "acme/plain" and manifest["entry"]["path"] is None
    assert json.loads((hub.store.root / "models/acme/plain/repo.json").read_text())["private"]


def test_unchanged_push_makes_no_commit(hub, homes, models):
    zoo("add", models.lora("plain"), "--name", "acme/plain", "--base", "tiny")
    zoo("push", "acme/plain")
    before = commits(hub, "acme/plain")
    result = zoo("push", "acme/plain")
    assert "unchanged" in result.stdout and "no new commit" in result.stdout
    assert commits(hub, "acme/plain") == before


def test_revision_branch(hub, homes, models):
    zoo("add", models.lora("plain"), "--name", "acme/plain", "--base", "tiny")
    zoo("push", "acme/plain", "--revision", "dev")
    assert zoo_json("show", "acme/plain")["hub"]["revision"] == "dev"
    homes("b")
    zoo("pull", "acme/plain@dev")
    assert zoo_json("show", "acme/plain")["hub"]["revision"] == "dev"
    homes("a")
    result = zoo("pull", "acme/other@nope", ok=False)
    assert result.exit_code == 1 and "not found" in result.stderr


def test_tampered_file_is_refused(hub, homes, models):
    zoo("add", models.lora("plain"), "--name", "acme/plain", "--base", "tiny")
    zoo("push", "acme/plain")
    weights = zoo_json("show", "acme/plain")["files"]["adapter_model.safetensors"]["sha256"]
    blob = hub.store.root / "models/acme/plain/blobs" / weights.removeprefix("sha256:")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    homes("b")
    result = zoo("pull", "acme/plain", ok=False)
    assert result.exit_code == 1  # the Hub's own listing says other bytes
    assert "adapter_model.safetensors changed between listing and download" in result.stderr
    assert "acme/plain" not in [e["name"] for e in zoo_json("list")]
    # a repo whose listing agrees with its bytes but not with its zoo.json
    from huggingface_hub import HfApi

    manifest = json.loads((hub.store.root / "models/acme/plain").joinpath(
        "blobs", hub.store.tree("model", "acme/plain", "main")[1]["zoo.json"]["sha256"]
    ).read_text())
    manifest["files"]["adapter_model.safetensors"]["sha256"] = "sha256:" + "0" * 64
    HfApi(endpoint=hub.url, token=WRITE).upload_file(
        path_or_fileobj=json.dumps(manifest).encode(), path_in_repo="zoo.json",
        repo_id="acme/plain")
    blob.write_bytes(bytes(data[:-1] + bytes([data[-1] ^ 0xFF])))  # the listed bytes again
    result = zoo("pull", "acme/plain", ok=False)
    assert "do not match their zoo.json hashes: adapter_model.safetensors" in result.stderr
    assert "acme/plain" not in [e["name"] for e in zoo_json("list")]


def test_interrupted_download_resumes(hub, homes, models, monkeypatch):
    zoo("add", models.lora("plain"), "--name", "acme/plain", "--base", "tiny")
    zoo("push", "acme/plain")
    homes("b")
    # huggingface_hub writes what it received in chunks of 10 MB; scale that to the tiny file
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 1024)
    hub.cut_short["acme/plain/adapter_model.safetensors"] = True
    zoo("pull", "acme/plain")
    gets = [r for m, f, r in hub.downloads if m == "GET" and f.endswith("adapter_model.safetensors")]
    assert gets[0] is None and gets[-1] is not None and gets[-1].startswith("bytes=")
    assert int(gets[-1].removeprefix("bytes=").rstrip("-")) > 0  # it continued, not restarted
    assert zoo("verify", "acme/plain").exit_code == 0


def test_offline_pulls_from_the_cache_only(hub, homes, models, monkeypatch):
    zoo("add", models.lora("plain"), "--name", "acme/plain", "--base", "tiny")
    zoo("push", "acme/plain")
    homes("b")
    zoo("pull", "acme/plain")
    zoo("rm", "acme/plain")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.shutdown()
    zoo("pull", "acme/plain")
    assert zoo_json("show", "acme/plain")["content_hash"]
    result = zoo("pull", "acme/never-pulled", ok=False)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "HF_HUB_OFFLINE" in result.stderr


def test_auth_errors_are_one_clear_line(hub, homes, models, monkeypatch):
    zoo("add", models.lora("plain"), "--name", "acme/plain", "--base", "tiny")
    zoo("push", "acme/plain")
    cases = [
        ("b", WRITE, ["pull", "acme/missing"], "repo acme/missing not found"),
        ("b", "hf_wrong_token_00000", ["pull", "acme/plain"], "refused the token (401)"),
        ("b", WRITE, ["pull", "acme/plain@nope"], "revision 'nope' does not exist in acme/plain"),
        ("a", READ, ["push", "acme/plain", "--revision", "new"], "may not write to acme/plain (403)"),
    ]
    for home, token, args, message in cases:
        homes(home)
        monkeypatch.setenv("HF_TOKEN", token)
        result = zoo(*args, ok=False)
        assert result.exit_code == 1, args
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1
        assert token not in result.output
    monkeypatch.delenv("HF_TOKEN")
    result = zoo("push", "acme/plain", "--token", "hf_wrong_token_00000", ok=False)
    assert "refused the token" in result.stderr and "hf_wrong_token_00000" not in result.output


def test_sync_two_machines(hub, homes, models):
    zoo("add", models.lora("plain"), "--name", "acme/a1", "--base", "tiny")
    zoo("sync", "--repo", "acme/index")
    homes("b")
    zoo("add", models.lora("second", r=2, lora_alpha=4, seed=9), "--name", "acme/b1",
        "--base", "tiny")
    result = zoo("sync", "--repo", "acme/index")
    assert "pulled: acme/a1" in result.stdout and "acme/b1" in result.stdout
    homes("a")
    result = zoo("sync", "--repo", "acme/index")
    assert "pulled: acme/b1" in result.stdout
    for which in ("a", "b"):
        homes(which)
        assert {e["name"] for e in zoo_json("list")} == {"tiny", "acme/a1", "acme/b1"}
        assert zoo("verify").exit_code == 0
    assert "in sync" in zoo("sync", "--repo", "acme/index").stdout
    index = json.loads((hub.store.root / "datasets/acme/index/repo.json").read_text())
    assert index["private"]


def test_sync_conflict_is_listed_and_left_alone(hub, homes, models):
    zoo("add", models.lora("plain"), "--name", "acme/same", "--base", "tiny")
    zoo("sync", "--repo", "acme/index")
    homes("b")
    zoo("add", models.lora("second", r=2, lora_alpha=4, seed=9), "--name", "acme/same",
        "--base", "tiny")
    mine = zoo_json("show", "acme/same")["content_hash"]
    result = zoo("sync", "--repo", "acme/index", ok=False)
    assert result.exit_code == 1 and "CONFLICT acme/same" in result.stdout
    assert zoo_json("show", "acme/same")["content_hash"] == mine
    homes("a")
    theirs = zoo_json("show", "acme/same")["content_hash"]
    assert theirs != mine and "in sync" in zoo("sync", "--repo", "acme/index").stdout


def test_token_is_never_stored(hub, homes, models, tmp_path):
    zoo("add", models.lora("plain"), "--name", "acme/plain", "--base", "tiny")
    outputs = [zoo("push", "acme/plain").output, zoo("sync", "--repo", "acme/index").output]
    homes("b")
    outputs.append(zoo("sync", "--repo", "acme/index").output)
    for text in outputs:
        assert WRITE not in text
    for path in tmp_path.rglob("*"):
        if path.is_file() and "hub-root" not in path.parts:
            assert WRITE.encode() not in path.read_bytes(), path


def test_pulling_an_adapter_pulls_its_known_base(hub, real_home, tmp_path, monkeypatch):
    """The embedded base is known by short name: a bare home gets it built too."""
    from tests.factory import save_lora
    base_dir = real_home / "bases/smollm2-135m-instruct"
    save_lora(base_dir, tmp_path / "real-lora", r=4, lora_alpha=8)
    zoo("add", tmp_path / "real-lora", "--name", "acme/real", "--base", "smollm2-135m-instruct")
    zoo("push", "acme/real")
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "bare"))
    result = zoo("pull", "acme/real")
    assert "pulling its base smollm2-135m-instruct" in result.stderr
    assert {e["name"] for e in zoo_json("list")} == {"smollm2-135m-instruct", "acme/real"}


def test_server_runs_on_its_own(tmp_path):
    from zoo.serve.launch import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "zoo.testing.hub", "--root",
                             str(tmp_path / "root"), "--port", str(port), "--token", WRITE],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert "test Hub serving" in proc.stdout.readline()
        from huggingface_hub import HfApi
        api = HfApi(endpoint=f"http://127.0.0.1:{port}", token=WRITE)
        api.create_repo("acme/x")
        api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="acme/x")
        assert api.list_repo_files("acme/x") == [".gitattributes", "a.txt"]
        assert (tmp_path / "root/models/acme/x/repo.json").exists()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/whoami-v2")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request)
    finally:
        proc.terminate()
        proc.wait(10)


def test_two_syncs_racing_both_land(hub, homes, models, monkeypatch):
    """B commits to the index between A's read and A's commit: A's commit is refused (412),
    and A reads the new index, merges again and lands, instead of failing."""
    from zoo.catalog.registry import Registry
    from zoo.hub import sync as sync_module

    home_a = homes("a")
    zoo("add", models.lora("plain"), "--name", "acme/a1", "--base", "tiny")
    home_b = homes("b")
    zoo("add", models.lora("second", r=2, lora_alpha=4, seed=9), "--name", "acme/b1",
        "--base", "tiny")
    real_read = sync_module._read_index
    b_results = []

    def read_then_let_b_commit_first(ctx, index, commit):
        catalog = real_read(ctx, index, commit)
        if not b_results:
            b_results.append(None)
            b_results[0] = sync_module.sync(index, registry=Registry(home_b))
        return catalog

    monkeypatch.setattr(sync_module, "_read_index", read_then_let_b_commit_first)
    lines: list[str] = []
    result = sync_module.sync("acme/index", registry=Registry(home_a), log=lines.append)
    assert b_results[0].commit is not None and result.commit is not None
    assert "the index changed while syncing; trying again" in lines
    index_head = hub.store.root / "datasets/acme/index"
    assert commits(hub, "acme/index", "datasets") >= 2 and index_head.exists()
    monkeypatch.setattr(sync_module, "_read_index", real_read)
    homes("b")
    assert "pulled: acme/a1" in zoo("sync", "--repo", "acme/index").stdout
    for which in ("a", "b"):
        homes(which)
        zoo("sync", "--repo", "acme/index")
        assert {e["name"] for e in zoo_json("list")} == {"tiny", "acme/a1", "acme/b1"}


def rewrite_manifest(hub, repo: str, change) -> None:
    """What a hostile publisher can do: commit any zoo.json it likes to its own repo."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=WRITE)
    path = api.hf_hub_download(repo, "zoo.json", cache_dir=hub.store.root.parent / "evil-cache")
    data = json.loads(Path(path).read_text())
    change(data)
    api.upload_file(path_or_fileobj=json.dumps(data).encode(), path_in_repo="zoo.json",
                    repo_id=repo)


def test_a_repo_manifest_does_not_choose_the_local_name(hub, homes, models):
    """Issue 10, item 2: zoo pull ORG/NAME registers ORG/NAME, whatever zoo.json says."""
    zoo("add", models.lora("plain"), "--name", "evil/innocent", "--base", "tiny")
    zoo("push", "evil/innocent")

    def claim(data):
        data["entry"]["name"] = "globex/secret"
        data["entry"]["training"] = {"steps": [1, 2], "nested": {"x": 1}}  # malformed

    rewrite_manifest(hub, "evil/innocent", claim)
    homes("b")
    zoo("add", models.lora("second", r=2, lora_alpha=4, seed=9), "--name", "globex/secret",
        "--base", "tiny")
    secret = zoo_json("show", "globex/secret")
    zoo("pull", "evil/innocent")
    assert {e["name"] for e in zoo_json("list")} == {"tiny", "evil/innocent", "globex/secret"}
    assert zoo_json("show", "globex/secret") == secret
    assert zoo_json("show", "evil/innocent")["training"] is None  # dropped, not kept
    result = zoo("pull", "evil/innocent", "--name", "globex/secret", ok=False)
    assert result.exit_code == 1 and "already registered" in result.stderr
    assert zoo_json("show", "globex/secret") == secret
    zoo("pull", "evil/innocent", "--name", "mine/copy")
    assert zoo_json("show", "mine/copy")["content_hash"] == \
        zoo_json("show", "evil/innocent")["content_hash"]
    zoo("push", "evil/innocent", "--repo", "evil/again")  # a later push still works


def test_a_sync_index_cannot_map_a_name_onto_another_repo(hub, homes, models, tmp_path):
    from huggingface_hub import HfApi

    zoo("add", models.lora("plain"), "--name", "evil/x", "--base", "tiny", )
    zoo("add", models.lora("second", r=2, lora_alpha=4, seed=9), "--name", "local-only",
        "--base", "tiny")
    zoo("sync", "--repo", "acme/index")
    api = HfApi(endpoint=hub.url, token=WRITE)
    index = json.loads(Path(api.hf_hub_download("acme/index", "registry.json",
                                                repo_type="dataset",
                                                cache_dir=tmp_path / "c")).read_text())
    assert "path" not in index["entries"]["local-only"]["source"]  # no local paths published
    forged = dict(index["entries"]["evil/x"], name="globex/secret")
    index["entries"]["globex/secret"] = forged
    api.upload_file(path_or_fileobj=json.dumps(index).encode(), path_in_repo="registry.json",
                    repo_id="acme/index", repo_type="dataset")
    homes("b")
    result = zoo("sync", "--repo", "acme/index")
    assert "globex/secret" in result.stdout and "does not match its name" in result.stdout
    assert "globex/secret" not in {e["name"] for e in zoo_json("list")}
    assert "evil/x" in {e["name"] for e in zoo_json("list")}


def test_versions_travel_with_push_pull_and_sync(hub, homes, models, tmp_path):
    """A version is a commit of the name's repo; a newer commit pulls in as a new version when
    asked; sync carries every version, the current one and the aliases."""
    from safetensors.torch import load_file, save_file

    src = models.lora("plain")
    second = tmp_path / "second"
    second.mkdir()
    (second / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    save_file({k: v * 2 if "lora_B" in k else v for k, v in
               load_file(src / "adapter_model.safetensors").items()},
              second / "adapter_model.safetensors")
    zoo("add", src, "--name", "acme/v", "--base", "tiny")
    zoo("push", "acme/v")
    zoo("add", second, "--name", "acme/v", "--new-version")
    zoo("push", "acme/v:v2")
    pushed = zoo_json("show", "acme/v:v2")
    assert pushed["hub"]["commit"] != zoo_json("show", "acme/v")["hub"]["commit"]
    zoo("promote", "acme/v", "v2", "--force")
    zoo("alias", "acme/v:v1", "stable")
    first_commit = zoo_json("show", "acme/v:v1")["hub"]["commit"]
    homes("b")  # the repo at its first commit, then its newer one as a new version
    zoo("pull", f"acme/v@{first_commit}")
    assert "already registered" in zoo("pull", "acme/v", ok=False).stderr
    assert "acme/v:v2" in zoo("pull", "acme/v", "--new-version").stdout
    assert zoo_json("show", "acme/v:v2")["content_hash"] == pushed["content_hash"]
    homes("a")
    zoo("sync", "--repo", "acme/index")
    homes("b")
    zoo("rm", "acme/v")
    # this process plays a server of tiny here, started with a rank below the adapter's: sync
    # follows the index all the same, and says that server will refuse the new current
    from zoo.catalog.registry import Registry
    from zoo.serve.policy import ServePolicy

    ServePolicy(Registry(), "tiny", 2).record_engine()
    warned = zoo("sync", "--repo", "acme/index")
    assert "acme/v:v2 is current now, and refused by the zoo serve of pid" in warned.output
    synced = zoo_json("versions", "acme/v")
    contents = {v["content_hash"] for v in synced["versions"]}
    homes("a")
    mine = zoo_json("versions", "acme/v")
    assert contents == {v["content_hash"] for v in mine["versions"]}
    homes("b")
    current = zoo_json("show", "acme/v")
    assert current["content_hash"] == pushed["content_hash"]  # v2 is current there too
    assert zoo_json("show", "acme/v:stable")["content_hash"] != pushed["content_hash"]


def test_a_malformed_index_entry_is_skipped_and_kept_as_it_is(hub, homes, models, tmp_path):
    """A sync index is anyone's to write: an entry this zoo cannot read is reported and
    left out (it once stopped every sync of the index), and kept in the index untouched
    when this zoo publishes its own."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=WRITE)

    def index(cache: str) -> dict:
        return json.loads(Path(api.hf_hub_download(
            "acme/index", "registry.json", repo_type="dataset",
            cache_dir=tmp_path / cache)).read_text())

    zoo("add", models.lora("plain"), "--name", "acme/good", "--base", "tiny")
    zoo("sync", "--repo", "acme/index")
    edited = index("before")
    good = edited["entries"]["acme/good"]
    edited["entries"]["acme/bad"] = dict(good, name="acme/bad", rank="8")
    edited["entries"]["acme/broken"] = dict(good, name="acme/broken", versions=5)
    api.upload_file(path_or_fileobj=json.dumps(edited).encode(), path_in_repo="registry.json",
                    repo_id="acme/index", repo_type="dataset")
    homes("b")
    zoo("add", models.lora("second", r=2, lora_alpha=4, seed=9), "--name", "acme/b1",
        "--base", "tiny")
    result = zoo("sync", "--repo", "acme/index")
    assert "pulled: acme/good" in result.stdout
    assert "acme/bad (its entry in the index is malformed: rank is '8', not int)" in result.stdout
    assert "acme/broken (its entry in the index is malformed: versions is 5" in result.stdout
    assert {e["name"] for e in zoo_json("list")} == {"tiny", "acme/good", "acme/b1"}
    after = index("after")
    assert after["entries"]["acme/bad"] == edited["entries"]["acme/bad"]
    assert after["entries"]["acme/broken"] == edited["entries"]["acme/broken"]
    assert "acme/b1" in after["entries"]
    api.upload_file(path_or_fileobj=b"{not json", path_in_repo="registry.json",
                    repo_id="acme/index", repo_type="dataset")
    result = zoo("sync", "--repo", "acme/index", ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "the index acme/index holds no registry zoo can read: registry.json is not valid " \
           "JSON" in result.stderr and "ZOO_HOME" not in result.stderr


def test_a_repos_address_on_the_hub_pulls_it(hub, homes, models):
    """What a user copies from the browser's address bar: the repo's page, a revision's
    tree or a file's page under it."""
    zoo("add", models.lora("plain"), "--name", "acme/plain", "--base", "tiny")
    zoo("push", "acme/plain")
    pushed = zoo_json("show", "acme/plain")["content_hash"]
    homes("b")
    result = zoo("pull", f"{hub.url}/acme/plain/tree/main")
    assert "pulled acme/plain (lora) from acme/plain" in result.stdout
    assert zoo_json("show", "acme/plain")["content_hash"] == pushed
    assert "already in the zoo" in zoo("pull", f"{hub.url}/acme/plain/").stdout
    assert "already in the zoo" in zoo(
        "pull", f"{hub.url}/acme/plain/blob/main/adapter_config.json").stdout
    refused = zoo("pull", f"{hub.url}/datasets/acme/index", ok=False)
    assert refused.exit_code == 1 and "is a dataset repo, not a model's" in refused.stderr


def test_several_refs_pull_in_turn_and_a_failure_stops_none(hub, homes, models):
    for name, seed in (("acme/one", 1), ("acme/two", 2)):
        zoo("add", models.lora(name.replace("/", "-"), seed=seed), "--name", name,
            "--base", "tiny")
        zoo("push", name)
    zoo("sync", "--repo", "acme/index")  # a dataset of acme's: never a model to pull
    homes("b")
    hub.page_size = 1  # the Hub's listing comes in pages: each is followed
    result = zoo("pull", "acme/*")
    assert "2 to pull" in result.stderr and "pulled 2 of 2" in result.stdout
    assert {e["name"] for e in zoo_json("list")} == {"tiny", "acme/one", "acme/two"}
    for pattern, said in (("acme/z*", "no model repo of acme at "), ("ac*/one", "not ORG/PATTERN")):
        result = zoo("pull", pattern, ok=False)
        assert result.exit_code == 1 and said in result.stderr, result.stderr
    homes("c")
    zoo("add", models.llama, "--name", "tiny")
    result = zoo("pull", "acme/one", "acme/nowhere", "acme/two", ok=False)
    assert result.exit_code == 1
    assert "pulled acme/one (lora) from acme/one" in result.stdout
    assert "pulled acme/two (lora) from acme/two" in result.stdout
    assert result.stdout.rstrip().endswith("pulled 2 of 3; failed: acme/nowhere")
    assert "error: acme/nowhere: " in result.stderr and "acme/one" not in result.stderr
    assert {e["name"] for e in zoo_json("list")} == {"tiny", "acme/one", "acme/two"}
    again = zoo("pull", "acme/one", "acme/two")
    assert again.stdout.count("already in the zoo") == 2 and "pulled 2 of 2" in again.stdout
    refused = zoo("pull", "acme/one", "acme/two", "--name", "x/y", ok=False)
    assert refused.exit_code == 2 and "--name names one entry" in refused.stderr
