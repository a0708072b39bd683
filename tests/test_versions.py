"""Adapter versions: numbered and immutable, aliases, canary, the evaluation gate,
rollback, retention, and their provenance, through the real `zoo` commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import zoo, zoo_json
from zoo.catalog.registry import Registry
from zoo.core.process import identity

TEXT = ("The lighthouse keeper climbed the stairs every evening and lit the lamp. " * 8).strip()


@pytest.fixture
def tiny(models, tmp_path, zoo_home):
    zoo("add", models.llama, "--name", "tiny")
    data = tmp_path / "held.txt"
    data.write_text(TEXT)
    return models, data


def scaled(src: Path, dst: Path, factor: float) -> Path:
    """A copy of an adapter with its B matrices scaled: 0 is the base exactly, large
    values push the model away from it (a worse held-out loss)."""
    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()},
              dst / "adapter_model.safetensors")
    return dst


def test_new_content_is_a_new_version_that_serves_nobody_until_promoted(tiny, tmp_path,
                                                                       zoo_home):
    models, _ = tiny
    first = models.lora("plain")
    zoo("add", first, "--name", "acme/x", "--base", "tiny")
    second = scaled(first, tmp_path / "second", 0.5)
    refused = zoo("add", second, "--name", "acme/x", "--base", "tiny", ok=False)
    assert refused.exit_code == 1 and "already registered" in refused.stderr
    out = zoo("add", second, "--name", "acme/x", "--new-version").stdout
    assert "added acme/x:v2" in out and "zoo promote acme/x v2" in out
    again = zoo("add", first, "--name", "acme/x", "--new-version").stdout
    assert "added acme/x " in again  # the same content as v1: nothing new
    entry = zoo_json("show", "acme/x")
    assert entry["version"] == 1 and set(entry["versions"]) == {"2"}
    v2 = zoo_json("show", "acme/x:v2")
    assert v2["version"] == 2 and v2["path"].endswith("adapters/acme/x@v2")
    assert v2["content_hash"] != entry["content_hash"]
    listed = zoo_json("versions", "acme/x")
    assert [v["version"] for v in listed["versions"]] == [2, 1]
    assert listed["versions"][1]["aliases"] == ["current"]
    assert zoo("verify").exit_code == 0


def test_promote_is_gated_on_held_out_loss_and_rollback_is_one_step(tiny, tmp_path, zoo_home):
    models, data = tiny
    noisy = models.lora("plain")  # B scaled up: worse than the base on real text
    zoo("add", noisy, "--name", "acme/x", "--base", "tiny")
    zoo("add", scaled(noisy, tmp_path / "quiet", 0.0), "--name", "acme/x", "--new-version")
    zoo("add", scaled(noisy, tmp_path / "loud", 200.0), "--name", "acme/x", "--new-version")
    out = zoo("promote", "acme/x", "v2", "--data", data).stdout  # the base's loss: better
    assert "acme/x: v2 is current" in out and "gate: held-out loss" in out
    # (a random tiny model: the loud adapter costs about 1% of loss, so the bound is tight)
    refused = zoo("promote", "acme/x", "v3", "--data", data, "--max-regression", "0.002",
                  ok=False)
    assert refused.exit_code == 1 and "raises the held-out loss" in refused.stderr, \
        refused.output
    assert "against" in refused.stderr  # both numbers in the message
    assert zoo_json("show", "acme/x")["version"] == 2  # nothing changed
    for bad in (["--max-regression", "nan"], ["--canary", "150"], ["--canary", "nan"]):
        refused = zoo("promote", "acme/x", "v3", "--data", data, *bad, ok=False)
        assert refused.exit_code == 1 and "evaluating" not in refused.output, bad  # no gate run
    forced = zoo("promote", "acme/x", "v3", "--data", data, "--max-regression", "0.002",
                 "--force").stdout
    assert "(forced)" in forced
    entry = zoo_json("show", "acme/x")
    assert entry["version"] == 3 and entry["aliases"]["previous"] == 2
    last = entry["history"][-1]
    assert last["action"] == "promote" and last["forced"] is True
    assert last["evaluation"]["candidate_loss"] > last["evaluation"]["current_loss"]
    # each version keeps its own evaluations
    assert zoo_json("show", "acme/x:v2")["evaluations"]["original"]["tokens"] > 10
    zoo("rollback", "acme/x")
    entry = zoo_json("show", "acme/x")
    assert entry["version"] == 2 and entry["aliases"]["previous"] == 3
    assert entry["history"][-1]["action"] == "rollback"


def test_canary_aliases_removal_and_retention(tiny, tmp_path, zoo_home):
    models, _ = tiny
    src = models.lora("plain")
    zoo("add", src, "--name", "acme/x", "--base", "tiny")
    for i in range(2, 6):
        zoo("add", scaled(src, tmp_path / f"v{i}", 1.0 + i / 10), "--name", "acme/x",
            "--new-version")
    zoo("promote", "acme/x", "v2", "--force")
    zoo("promote", "acme/x", "v4", "--canary", "10", "--force")
    entry = zoo_json("show", "acme/x")
    assert entry["canary"] == {"version": 4, "percent": 10.0}
    zoo("alias", "acme/x:v3", "champion")
    assert zoo_json("show", "acme/x:champion")["version"] == 3
    for ref, why in (("acme/x:v2", "current"), ("acme/x:v4", "canary"),
                     ("acme/x:champion", "alias champion")):
        refused = zoo("rm", ref, ok=False)
        assert refused.exit_code == 1 and f"it is {why}" in refused.stderr
    zoo("gc", "acme/x", "--keep", "0")  # v1 (previous) is protected by its alias; v5 goes
    left = {v["version"] for v in zoo_json("versions", "acme/x")["versions"]}
    assert left == {1, 2, 3, 4}
    assert not (zoo_home / "adapters/acme/x@v5").exists()
    zoo("promote", "acme/x", "--end-canary")
    zoo("rm", "acme/x:v4")
    assert not (zoo_home / "adapters/acme/x@v4").exists()
    zoo("rm", "acme/x")  # every version
    assert not list((zoo_home / "adapters").glob("acme/x*"))
    assert zoo("verify").exit_code == 0


def test_gc_keeps_what_a_running_server_answers_with(tiny, tmp_path, zoo_home):
    from zoo.catalog.versions import record_in_use

    models, _ = tiny
    src = models.lora("plain")
    zoo("add", src, "--name", "acme/x", "--base", "tiny")
    zoo("add", scaled(src, tmp_path / "v2", 2.0), "--name", "acme/x", "--new-version")
    record_in_use(zoo_home, {"acme/x:v2"})  # this process plays a server answering with v2
    assert "nothing to remove" in zoo("gc", "acme/x", "--keep", "0").stdout
    (zoo_home / "run").joinpath(next(p.name for p in (zoo_home / "run").iterdir())).unlink()
    assert "removed v2" in zoo("gc", "acme/x", "--keep", "0").stdout


def test_derived_versions_record_where_they_came_from(tiny, tmp_path, zoo_home):
    models, _ = tiny
    src = models.lora("plain")
    zoo("add", src, "--name", "acme/x", "--base", "tiny")
    zoo("add", scaled(src, tmp_path / "v2", 2.0), "--name", "acme/x", "--new-version")
    zoo("compress", "acme/x:v2", "--rank", "2", "--name", "acme/small")
    source = zoo_json("show", "acme/small")["source"]
    assert source["from"] == "acme/x" and source["from_version"] == 2
    assert source["from_hash"] == zoo_json("show", "acme/x:v2")["content_hash"]
    zoo("compress", "acme/x", "--rank", "3", "--name", "acme/small", "--new-version")
    assert zoo_json("show", "acme/small:v2")["source"]["from_version"] == 1
    zoo("merge", "--adapter", "acme/x:v2", "--adapter", "acme/x", "--to-adapter", "acme/both")
    adapters = zoo_json("show", "acme/both")["source"]["adapters"]
    assert [(a["name"], a["version"]) for a in adapters] == [("acme/x", 2), ("acme/x", 1)]
    zoo("merge", "--adapter", "acme/x:v2", "--to-adapter", "acme/both", "--new-version")
    assert zoo_json("show", "acme/both:v2")["version"] == 2


def test_a_version_of_another_base_is_refused(tiny, models, zoo_home):
    zoo("add", models.lora("plain"), "--name", "acme/x", "--base", "tiny")
    zoo("add", models.llama_wide, "--name", "wide")
    other = models.lora("wide", base=models.llama_wide)
    refused = zoo("add", other, "--name", "acme/x", "--base", "wide", "--new-version", ok=False)
    assert refused.exit_code == 1 and "belongs to 'tiny'" in refused.stderr
    assert set(json.loads((zoo_home / "registry.json").read_text())["entries"]["acme/x"]) \
        .isdisjoint({"versions"})
    assert Registry(zoo_home).load().adapter("acme/x").latest() == 1


def test_a_lease_lists_what_its_server_holds_and_grows_by_a_line_per_change(zoo_home):
    from zoo.catalog.versions import in_use, record_in_use

    record_in_use(zoo_home, {"acme/x:v1"})
    record_in_use(zoo_home, {"acme/x:v1", "acme/y:v3"})
    assert in_use(zoo_home) == {"acme/x:v1", "acme/y:v3"}
    lease = next((zoo_home / "run").glob("serve-*.lease"))
    size = lease.stat().st_size
    record_in_use(zoo_home, {"acme/x:v1", "acme/y:v3"})  # nothing new: nothing written
    assert lease.stat().st_size == size
    record_in_use(zoo_home, {"acme/y:v3", "acme/z:v1"})
    assert lease.read_text().splitlines()[2:] == ["+acme/z:v1", "-acme/x:v1"]  # appended
    assert in_use(zoo_home) == {"acme/y:v3", "acme/z:v1"}
    with lease.open("a") as f:
        f.write("+acme/half")  # a line still being written counts only once it ends
    assert in_use(zoo_home) == {"acme/y:v3", "acme/z:v1"}
    dead = zoo_home / "run" / "serve-999999999.lease"  # no such process
    dead.write_text("+acme/old:v1\n")
    assert in_use(zoo_home) == {"acme/y:v3", "acme/z:v1"} and not dead.exists()
    earlier = zoo_home / "run" / f"serve-{os.getppid()}.json"  # an earlier zoo's lease
    earlier.write_text(json.dumps({"pid": os.getppid(), "versions": ["acme/w:v2"]}))
    assert in_use(zoo_home) == {"acme/y:v3", "acme/z:v1", "acme/w:v2"}


def test_a_dead_servers_pid_in_another_process_keeps_nothing_of_it(zoo_home):
    """A container restarted on the same home volume gives its processes the dead ones'
    pids again: a crashed server's lease, engine limits, in-flight reservations and
    staging files name it by pid and start time, so another process with its pid does
    not keep them alive. A bare pid (what an earlier zoo wrote) is judged by the pid."""
    from zoo.catalog.home import sweep_stale
    from zoo.catalog.versions import in_use, running_engines
    from zoo.core.process import PID_BITS, alive, started
    from zoo.serve.meter import Meter

    me = os.getpid()
    ghost = (started(me) - 100) << PID_BITS | me  # this pid, a second before this process
    assert alive(identity()) and alive(me) and not alive(ghost)
    run = zoo_home / "run"
    run.mkdir(parents=True)
    (run / f"serve-{ghost}.lease").write_text("+acme/old:v1\n")
    (run / f"serve-{ghost}.engine").write_text(
        json.dumps({"base": "tiny", "max_lora_rank": 1, "wrapped": None}))
    (run / f"serve-{me}.lease").write_text("+acme/earlier:v2\n")  # an earlier zoo's, alive
    assert in_use(zoo_home) == {"acme/earlier:v2"} and running_engines(zoo_home) == []
    assert sorted(p.name for p in run.iterdir()) == [f"serve-{me}.lease"]
    assert Meter(zoo_home, server=ghost).admit("x", "acme", {"concurrent": 1}, 10).ok
    assert Meter(zoo_home).admit("y", "acme", {"concurrent": 1}, 10).ok  # the ghost's row went
    assert not Meter(zoo_home).admit("z", "acme", {"concurrent": 1}, 10).ok  # y's has not
    (zoo_home / "tmp").mkdir()
    (zoo_home / "tmp" / f"acme_x.pid{ghost}.abc").mkdir()
    (zoo_home / "tmp" / f"acme_x.pid{identity()}.def").mkdir()
    sweep_stale(zoo_home)
    assert [p.name for p in (zoo_home / "tmp").iterdir()] == [f"acme_x.pid{identity()}.def"]


def test_promote_refuses_a_version_a_running_server_would_refuse(tiny, zoo_home):
    """A server sizes its engine (--max-lora-rank, with --lora-targets catalog its LoRA
    layers) from the catalog at start; a version registered later may not fit it. Sent to
    it as current or canary, every request it answers would fail with a 400: promote
    refuses first, with the server's reason, and --force goes through, recorded."""
    from zoo.serve.policy import ServePolicy, wrapped_modules

    def server(base: str, rank: int, wrapped: str | None) -> None:
        """This process plays a running server with these limits."""
        ServePolicy(Registry(zoo_home), base, rank, wrapped=wrapped_modules(wrapped))\
            .record_engine()

    models, data = tiny
    gate = ["--data", data, "--max-regression", "100"]  # the loss gate is not tested here
    zoo("add", models.lora("plain"), "--name", "acme/x", "--base", "tiny")
    zoo("add", models.lora("o-and-rank-8", r=8, target_modules=["q_proj", "v_proj", "o_proj"]),
        "--name", "acme/x", "--new-version")
    zoo("add", models.lora("k", target_modules=["k_proj"]), "--name", "acme/x", "--new-version")
    server("tiny", 4, "q_proj,v_proj")  # started on v1 alone: rank 4, q and v
    before = (zoo_home / "registry.json").read_bytes()
    for canary in ([], ["--canary", "10"]):
        refused = zoo("promote", "acme/x", "v2", *gate, *canary, ok=False)
        assert refused.exit_code == 1, refused.output
        assert f"the zoo serve of pid {os.getpid()}" in refused.stderr
        assert "has rank 8, above this server's --max-lora-rank 4" in refused.stderr
        assert "nothing changed" in refused.stderr
    assert (zoo_home / "registry.json").read_bytes() == before
    # k is fused with q and v in vLLM's qkv layer: that engine adapts it
    assert "v3 answers 10.0%" in zoo("promote", "acme/x", "v3", "--canary", "10", *gate).stdout
    server("tiny", 16, "q_proj,v_proj")  # a rank to spare: o_proj alone is in the way
    refused = zoo("promote", "acme/x", "v2", *gate, ok=False)
    assert "trains o_proj" in refused.stderr and "--lora-targets all" in refused.stderr
    server("other", 4, "q_proj,v_proj")  # a server of another base never answers acme/x
    assert "v2 answers 5.0%" in zoo("promote", "acme/x", "v2", "--canary", "5", *gate).stdout
    server("tiny", 16, "q_proj,v_proj")
    forced = zoo("promote", "acme/x", "v2", *gate, "--force")
    assert "v2 is current" in forced.stdout and "refused by" in forced.output
    last = zoo_json("show", "acme/x")["history"][-1]
    assert last["forced"] is True and "trains o_proj" in last["refused_by"][0]
    assert "warning" not in zoo("rollback", "acme/x").output  # to v1, which it serves
    back = zoo("rollback", "acme/x")  # the way back is never refused; the server is named
    assert "v2 is current again" in back.stdout
    assert f"refused by the zoo serve of pid {os.getpid()}: it trains o_proj" in back.stderr
    (zoo_home / "run" / f"serve-{identity()}.engine").unlink()
    dead = zoo_home / "run" / "serve-999999999.engine"  # a server gone: not asked
    dead.write_text(json.dumps({"base": "tiny", "max_lora_rank": 1, "wrapped": None}))
    zoo("rollback", "acme/x")
    assert "v2 is current" in zoo("promote", "acme/x", "v2", *gate).stdout
    assert not dead.exists()
