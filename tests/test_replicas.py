"""Replicas behind vLLM's own router: `zoo serve --replicas 2` and `zoo route`, for real.

Two small engines of the real base (1 GiB of KV cache each, one core each) and
vllm-router in front; the same requests, tenants and hot adds as one engine,
a replica killed with SIGKILL under load, and two homes kept in step by
`zoo sync` behind `zoo route`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import linked_home
from tests.factory import save_lora
from tests.helpers import process_tree, processes_with_env, wait_until
from zoo.catalog.registry import Registry
from zoo.catalog.store import add
from zoo.serve.launch import ServeOptions, free_port, stop, wait_healthy

pytestmark = pytest.mark.vllm

BASE = "smollm2-135m-instruct"
KEYS = {"acme": "sk-acme-0000001", "globex": "sk-globex-0000001", "ops": "sk-ops-00000001"}
SMALL = ("--kv-cache-memory-bytes", str(1024**3))  # two engines and a third fit in memory


def post(url: str, model: str, key: str | None = KEYS["ops"], session: str | None = None,
         max_tokens: int = 8, timeout: float = 300, **extra) -> tuple[int, dict]:
    body = json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0,
                       "messages": [{"role": "user", "content": "Say hello."}],
                       **extra}).encode()
    request = urllib.request.Request(url + "/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if session:
        request.add_header("X-Session-ID", session)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            return error.code, json.loads(text or "{}")
        except ValueError:  # the router's own errors are plain text
            return error.code, {"error": text}


def get(url: str, key: str | None = KEYS["ops"]) -> dict:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def usage(replica_url: str, here: bool = True) -> dict[str, int]:
    """Requests per adapter answered by this replica (or, not ``here``, by the whole home:
    the replicas share one meter)."""
    rows = get(replica_url + "/zoo/usage" + ("?server=this" if here else ""))["usage"]
    found: dict[str, int] = {}
    for row in rows:  # rows are per version (NAME:vN): added up by name
        name = row["model"].partition(":")[0]
        found[name] = found.get(name, 0) + row["requests"]
    return found


@pytest.fixture(scope="module")
def adapters(smollm2_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("replica-loras")
    base_dir = smollm2_home / "bases" / BASE
    return {tag: save_lora(base_dir, root / tag, seed=seed, r=8, lora_alpha=16)
            for tag, seed in (("a", 11), ("b", 12), ("c", 13), ("late", 14))}


@pytest.fixture(scope="module")
def fleet(smollm2_w8a8_home, tmp_path_factory, adapters):
    from zoo.serve.replicas import running_fleet

    home = linked_home(smollm2_w8a8_home, tmp_path_factory.mktemp("replicas") / "home")
    registry = Registry(home)
    add(adapters["a"], "acme/a", BASE, registry=registry)
    add(adapters["b"], "acme/b", BASE, registry=registry)
    add(adapters["c"], "globex/c", BASE, registry=registry)
    keys = home.parent / "keys.json"
    keys.write_text(json.dumps({"tenants": {
        "acme": {"keys": [KEYS["acme"]]},
        "globex": {"keys": [KEYS["globex"]], "adapters": ["globex/*"]},
        "ops": {"keys": [KEYS["ops"]], "adapters": ["*"]}}}))
    lines: list[str] = []
    options = ServeOptions(base=BASE, port=free_port(), api_keys=keys, max_loras=4,
                           extra_args=SMALL)
    with running_fleet(options, 2, "consistent_hash", registry, log=lines.append) as running:
        yield SimpleNamespace(fleet=running, url=running.url, lines=lines, registry=registry,
                              home=home)
    # stopped: no process of any replica is left
    assert wait_until(lambda: not processes_with_env("ZOO_HOME", str(home)), timeout=60)


def spread(fleet, model: str, key: str = KEYS["ops"], sessions=("s1", "s2", "s3", "s4")):
    """Requests with several session keys, so that both replicas get some."""
    return [post(fleet.url, model, key, session=s) for s in sessions]


def test_the_router_serves_the_base_and_every_adapter_from_both_replicas(fleet):
    assert len(fleet.fleet.replicas) == 2
    for model in (BASE, "acme/a", "acme/b", "globex/c"):
        replies = spread(fleet, model, sessions=[f"{model}-{i}" for i in range(6)])
        assert all(status == 200 for status, _ in replies), replies
        assert all(r["choices"][0]["message"]["content"] for _, r in replies)
    per_replica = [usage(r.url) for r in fleet.fleet.replicas]
    for model in ("acme/a", "acme/b", "globex/c"):  # rows add up to what was sent
        assert sum(u.get(model, 0) for u in per_replica) == 6
    assert all(sum(u.values()) > 0 for u in per_replica)  # both replicas served
    home_wide = [usage(r.url, here=False) for r in fleet.fleet.replicas]
    assert home_wide[0] == home_wide[1]  # one meter for the home: each replica reads it all
    assert all(home_wide[0][m] == 6 for m in ("acme/a", "acme/b", "globex/c"))


def test_the_same_adapter_and_session_land_on_one_replica(fleet):
    before = [usage(r.url).get("acme/b", 0) for r in fleet.fleet.replicas]
    for _ in range(4):
        assert post(fleet.url, "acme/b", session="acme/b")[0] == 200
    after = [usage(r.url).get("acme/b", 0) for r in fleet.fleet.replicas]
    assert sorted(a - b for a, b in zip(after, before, strict=True)) == [0, 4]


def test_tenants_are_kept_apart_through_the_router(fleet):
    assert post(fleet.url, "acme/a", key=None)[0] == 401
    assert post(fleet.url, "acme/a", key="sk-wrong-000000")[0] == 401
    assert post(fleet.url, "acme/a", key=KEYS["globex"])[0] in (403, 404)
    assert post(fleet.url, "globex/c", key=KEYS["acme"])[0] in (403, 404)
    assert post(fleet.url, "acme/a", key=KEYS["acme"])[0] == 200
    models = {m["id"] for m in get(fleet.url + "/models", KEYS["acme"])["data"]}
    assert "acme/a" in models and "globex/c" not in models
    everything = {m["id"] for m in get(fleet.url + "/models")["data"]}
    assert {BASE, "acme/a", "acme/b", "globex/c"} <= everything


def test_an_adapter_added_while_running_is_served_through_the_router(fleet, adapters):
    assert post(fleet.url, "acme/late")[0] == 404
    add(adapters["late"], "acme/late", BASE, registry=fleet.registry)
    # the router hashes a session to a replica by their addresses, new ports each run: six
    # sessions all on one replica is a 1-in-32 chance (a CI run met it), sixteen 1 in 32,768
    replies = spread(fleet, "acme/late", sessions=[f"late-{i}" for i in range(16)])
    assert all(status == 200 for status, _ in replies), replies
    assert all(usage(r.url).get("acme/late", 0) > 0 for r in fleet.fleet.replicas)


def in_flight(replica) -> int:
    """Requests the replica's engine is running or has queued, from vLLM's own gauges."""
    request = urllib.request.Request(replica.url + "/metrics",
                                     headers={"Authorization": f"Bearer {KEYS['ops']}"})
    text = urllib.request.urlopen(request, timeout=30).read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))))


def router_complaints(fleet) -> list[str]:
    """The router's warnings and errors (unhealthy workers, retries, open circuits)."""
    lines = fleet.fleet.router_log.read_text(errors="replace").splitlines()
    return [line for line in lines if "WARN" in line or "ERROR" in line][-20:]


def fleet_processes(fleet) -> dict[int, set[int]]:
    """Every live process started for each replica (they inherit its state directory)."""
    return {r.index: processes_with_env("ZOO_SERVE_STATE", str(r.log_path.parent))
            for r in fleet.fleet.replicas}


def test_a_killed_replica_costs_at_most_its_running_requests(fleet):
    """SIGKILL to one replica's API server alone (as in the report of an engine that
    outlived its server): no more requests fail than the replica was running, its engine
    processes die with it, zoo restarts it, and then the fleet's processes are exactly the
    running replicas' trees."""
    victim = fleet.fleet.replicas[0]
    before = fleet_processes(fleet)
    assert before[victim.index] == process_tree(victim.process.pid)
    assert len(before[victim.index]) >= 3  # API server, engine core, worker
    old_pid = victim.process.pid
    sessions = [f"k{i}" for i in range(24)]
    # every request sent at once and none able to finish before the kill (256 tokens each,
    # the end-of-sequence token ignored; with 96, a replica's share could finish before the
    # other's gauges counted all of theirs on a slow CI run): once the replicas' engines
    # count all of them, no request arrives or leaves, and the victim's count is exact when
    # it is killed (vLLM's gauges lag a request's arrival: counted while requests still came
    # in, a request the victim's API server held but its engine had not counted failed
    # uncounted)
    with ThreadPoolExecutor(len(sessions)) as pool:
        running = [pool.submit(post, fleet.url, "acme/a", KEYS["ops"], s, 256, ignore_eos=True)
                   for s in sessions]
        counted = wait_until(lambda: sum(map(in_flight, fleet.fleet.replicas)) == len(sessions),
                             timeout=120)
        # what the next failure needs to tell its cause (one CI run met it: 641 of 642)
        assert counted, ([in_flight(r) for r in fleet.fleet.replicas],
                         [f.result()[0] for f in running if f.done()], fleet.lines[-20:],
                         router_complaints(fleet))
        assert not any(f.done() for f in running)
        victims_requests = in_flight(victim)
        os.kill(old_pid, signal.SIGKILL)
        during = [f.result() for f in running]
    failed = [r for r in during if r[0] != 200]
    assert victims_requests > 0 and len(failed) <= victims_requests, (victims_requests, failed)
    assert wait_until(lambda: not before[victim.index] & set().union(
        *fleet_processes(fleet).values()), timeout=60), "the old engine outlived its server"
    time.sleep(6)  # the router's health check (every 2 s) drops the dead replica
    after = [post(fleet.url, "acme/a", session=f"after-{i}") for i in range(12)]
    assert all(status == 200 for status, _ in after), after
    deadline = time.monotonic() + 600  # zoo restarts it and says so
    while time.monotonic() < deadline and victim.restarts == 0:
        time.sleep(1)
    assert any(f"replica {victim.index}" in line and "restarting" in line
               for line in fleet.lines), fleet.lines
    wait_healthy(victim.url, victim.process, victim.log_path, 600)
    assert post(victim.url + "/v1", "acme/a")[0] == 200
    now = fleet_processes(fleet)
    for replica in fleet.fleet.replicas:
        assert now[replica.index] == process_tree(replica.process.pid), replica.index
    assert not before[victim.index] & now[victim.index]


def test_zoo_route_serves_two_homes_kept_in_step_by_sync(fleet, smollm2_w8a8_home, adapters,
                                                        tmp_path, monkeypatch):
    """Home A (the fleet's) pushes an adapter and syncs the index; home B, on another
    'machine', syncs and serves it; `zoo route` puts both behind one URL."""
    from zoo.hub.push import push
    from zoo.hub.sync import sync
    from zoo.testing.hub import HubServer

    write = "hf_writer_token_0001"
    hub = HubServer(tmp_path / "hub", write_tokens=[write], read_tokens=[]).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", write)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        home_b = linked_home(smollm2_w8a8_home, tmp_path / "home-b")
        push("acme/a", repo="acme/a", registry=fleet.registry)
        sync("acme/index", registry=fleet.registry)
        sync("acme/index", registry=Registry(home_b))
        assert Registry(home_b).load().adapter("acme/a").content_hash == \
            fleet.registry.load().adapter("acme/a").content_hash
        # home B's server is `zoo serve` itself, killed with SIGKILL at the end: nothing of
        # it may be left running
        serve_port = free_port()
        with open(tmp_path / "serve-b.log", "wb") as out:
            serving = subprocess.Popen(
                [str(Path(sys.executable).with_name("zoo")), "serve", "--multi-lora",
                 "--base", BASE, "--port", str(serve_port), "--max-loras", "2", *SMALL],
                env={**os.environ, "ZOO_HOME": str(home_b)}, stdout=out,
                stderr=subprocess.STDOUT)
        server_b = f"http://127.0.0.1:{serve_port}"
        try:
            wait_healthy(server_b, serving, tmp_path / "serve-b.log", 900, "zoo serve")
            assert len(processes_with_env("ZOO_HOME", str(home_b))) >= 4  # + API, core, worker
            worker_a = fleet.fleet.replicas[1].url
            port = free_port()
            with open(tmp_path / "route.log", "wb") as out:
                router = subprocess.Popen(
                    [str(Path(sys.executable).with_name("zoo")), "route", "--worker",
                     server_b, "--worker", worker_a, "--port", str(port),
                     "--policy", "round_robin"],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                url = f"http://127.0.0.1:{port}"
                wait_healthy(url, router, tmp_path / "route.log", 60, "zoo route")
                replies = [post(url + "/v1", "acme/a") for _ in range(4)]
                assert all(status == 200 for status, _ in replies), replies
                assert usage(server_b).get("acme/a", 0) >= 1
                children = Path(f"/proc/{router.pid}/task/{router.pid}/children").read_text()
                assert children.split(), "zoo route runs vllm-router as its child"
            finally:
                stop(router, timeout=10)
            for pid in map(int, children.split()):  # SIGTERM to zoo route stops the router
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
        finally:
            serving.kill()
            serving.wait()
        assert wait_until(lambda: not processes_with_env("ZOO_HOME", str(home_b)), 60), \
            "vLLM processes outlived zoo serve's SIGKILL"
    finally:
        hub.shutdown()
