"""One real engine shared by tenants and versions: a canary set, promoted and rolled back
under load, without a restart or a failed request; vLLM's prefix cache never shared
between two versions of a name, or two tenants (the engine's own cached-token count); and
the fair scheduler: a tenant is not served behind another's queue or full batch, and backlogged tenants
are served in proportion to their weights (orders of completion, not timings)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import TENANT_KEYS as KEYS
from zoo.catalog.versions import end_canary, promote, rollback

pytestmark = pytest.mark.vllm

BASE = "smollm2-135m-instruct"
# well over one cache block (128 tokens on the CPU)
LONG = " ".join(f"Clause {i}: the keeper logs the weather, the ships and the lamp's oil."
                for i in range(40))


@pytest.fixture(scope="module")
def served(tenant_engine):
    return tenant_engine


def ask(url: str, model: str, user: str | None = None, prompt: str = "Hi", key=KEYS["acme"],
        max_tokens: int = 1, **sampling) -> tuple[int, str | None, dict]:
    """(status, the version that answered, usage) of one completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            **sampling}
    if user:
        body["user"] = user
    request = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return (response.status, response.headers.get("x-zoo-model"),
                    json.loads(response.read()).get("usage") or {})
    except urllib.error.HTTPError as error:
        return error.code, None, {}


def test_a_canary_gets_its_share_and_one_person_stays_on_one_version(served):
    promote(served.registry, "acme/x:v2", canary=10)
    try:
        users = [f"user-{i}" for i in range(1000)]
        with ThreadPoolExecutor(200) as pool:
            replies = list(pool.map(lambda u: ask(served.url, "acme/x", u), users))
        assert all(status == 200 for status, _, _ in replies), \
            [r for r in replies if r[0] != 200][:3]
        share = sum(version == "acme/x:v2" for _, version, _ in replies) / len(replies)
        assert abs(share - 0.10) <= 0.03, share
        again = [ask(served.url, "acme/x", u)[1] for u in users[:50]]
        assert again == [v for _, v, _ in replies[:50]]
    finally:
        end_canary(served.registry, "acme/x")


def test_promote_and_rollback_under_load_fail_nothing(served):
    """200 concurrent requests while a canary is set, then promoted, then rolled back: every
    request succeeds and is answered by a version that was current or canary at some
    moment while it was in flight."""
    states: list[tuple[float, set[str]]] = [(time.monotonic(), {"acme/x:v1"})]
    lock = threading.Lock()

    def change(action, answering: set[str]) -> None:
        action()
        with lock:
            states.append((time.monotonic(), answering))

    def one(i: int):
        start = time.monotonic()
        status, version, _ = ask(served.url, "acme/x", f"load-{i}", max_tokens=4)
        return start, time.monotonic(), status, version

    with ThreadPoolExecutor(200) as pool:
        futures = [pool.submit(one, i) for i in range(1000)]
        time.sleep(1.0)
        change(lambda: promote(served.registry, "acme/x:v2", canary=30),
               {"acme/x:v1", "acme/x:v2"})
        time.sleep(1.0)
        change(lambda: promote(served.registry, "acme/x:v2"), {"acme/x:v2"})
        time.sleep(1.0)
        change(lambda: rollback(served.registry, "acme/x"), {"acme/x:v1"})
        results = [f.result() for f in futures]
    assert all(status == 200 for _, _, status, _ in results), \
        [r for r in results if r[2] != 200][:3]
    for start, end, _, version in results:
        allowed = set()
        for i, (at, answering) in enumerate(states):
            until = states[i + 1][0] if i + 1 < len(states) else float("inf")
            if at <= end and until >= start:  # this state held while it was in flight
                allowed |= answering
        assert version in allowed, (version, start, end, states)
    assert {version for *_, version in results} == {"acme/x:v1", "acme/x:v2"}
    rolled_back = states[-1][0]
    assert any(start > rolled_back for start, *_ in results)  # the load outlived every change
    assert served.registry.load().adapter("acme/x").version == 1


def test_cached_prefixes_never_cross_versions_or_tenants(served):
    """The engine reports how many prompt tokens it served from its prefix cache: a long
    prompt asked again of the same version and tenant is cached (the probe works); of the
    other version of the name, or by another tenant, it is not."""
    def cached(model, key=KEYS["acme"]) -> int:
        status, _, usage = ask(served.url, model, prompt=LONG, key=key)
        assert status == 200
        return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0

    cached("acme/x:v1")
    assert cached("acme/x:v1") >= 128  # at least a block: the measurement sees hits
    assert cached("acme/x:v2") == 0
    cached(BASE)
    assert cached(BASE) >= 128
    assert cached(BASE, key=KEYS["globex"]) == 0


def test_a_tenant_is_not_served_behind_another_tenants_batch(served):
    """acme holds every place (8) with long requests and queues more; globex asks one: it is
    answered while all of acme's still run, by vLLM's own preemption of acme's newest (first
    come, first served would keep globex waiting until one of acme's 2,000 tokens ended)."""
    before = successes(served)
    blockers = hold_places(served, {"acme": 8})
    try:
        with ThreadPoolExecutor(8) as pool:
            queued = [pool.submit(ask, served.url, BASE, None, "Hi", KEYS["acme"], 16,
                                  ignore_eos=True) for _ in range(8)]
            until_queue(served, (8, 8), 60, "acme's 8 more queue")
            status, _, usage = ask(served.url, BASE, prompt="Tell me about lighthouses.",
                                   key=KEYS["globex"], max_tokens=16, ignore_eos=True)
            answered = successes(served)
            close(blockers)
            assert all(f.result()[0] == 200 for f in queued)
    finally:
        close(blockers)
    assert (status, usage.get("completion_tokens")) == (200, 16)
    # none of acme's ended and none was cancelled: a place was made by preempting one
    assert answered - before == 1  # globex's


def test_the_adapters_gauge_keeps_one_series_however_many_mixes_it_saw(served):
    """vllm:lora_requests_info names the running and waiting adapters in its labels; vLLM
    keeps a series for every mix it ever reported (/metrics growing with each new one):
    zoo's lora_info patch keeps the current one."""
    for model in ("acme/x", "globex/g", "acme/x", BASE):
        key = KEYS["globex"] if model.startswith("globex") else KEYS["acme"]
        assert ask(served.url, model, key=key, max_tokens=2)[0] == 200
    series = [line for line in metrics(served).splitlines()
              if line.startswith("vllm:lora_requests_info{")]
    assert len(series) == 1, series


def hold_places(served, holders: dict[str, int]) -> list:
    """Long streamed requests (closing one cancels it) holding the engine's places."""
    blockers = []
    for tenant, count in holders.items():
        for _ in range(count):
            body = {"model": BASE, "prompt": "Hi", "max_tokens": 2000, "ignore_eos": True,
                    "stream": True}
            request = urllib.request.Request(
                served.url + "/completions", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json",
                         "Authorization": f"Bearer {KEYS[tenant]}"})
            blockers.append(urllib.request.urlopen(request, timeout=300))
    until_queue(served, (len(blockers), 0), 60, "the long requests run")
    return blockers


def close(blockers: list) -> None:
    while blockers:
        blockers.pop().close()


def metrics(served) -> str:
    request = urllib.request.Request(served.root + "/metrics",
                                     headers={"Authorization": f"Bearer {KEYS['ops']}"})
    return urllib.request.urlopen(request, timeout=30).read().decode()


def metric(text: str, name: str) -> float:
    """The sum of a vLLM gauge's or counter's series (counters end in _total)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + "_total{")))


def successes(served) -> float:
    """Requests the engine has finished (not cancelled), by vLLM's own counter."""
    return metric(metrics(served), "vllm:request_success")


def engine_queue(served) -> tuple[int, int]:
    """(running, waiting) requests, from vLLM's own gauges (an operator reads /metrics)."""
    text = metrics(served)
    return (int(metric(text, "vllm:num_requests_running")),
            int(metric(text, "vllm:num_requests_waiting")))


def until_queue(served, wanted: tuple[int, int], timeout: float, what: str) -> None:
    """Wait until the engine's (running, waiting) is ``wanted``; a failure says what was
    seen, and when (requests that never reach the engine, or long ones that end early)."""
    start = time.monotonic()
    seen = [(0.0, engine_queue(served))]
    while seen[-1][1] != wanted:
        elapsed = time.monotonic() - start
        assert elapsed < timeout, f"{what}: (running, waiting) {wanted} never seen: {seen}"
        time.sleep(0.2)
        now = engine_queue(served)
        if now != seen[-1][1]:
            seen.append((round(time.monotonic() - start, 1), now))


def test_backlogged_tenants_are_served_by_weight(served):
    """globex weighs 3, acme 1. Long requests hold every place, each tenant its share (2 and
    6: nobody is preempted), while both queue 40 more; then they are cancelled, and the
    places go about three of every four to globex while both wait (orders of completion:
    all take 16 tokens)."""
    finished: list[str] = []
    lock = threading.Lock()

    def one(who: str):
        status, _, _ = ask(served.url, BASE, prompt="Tell me about ships.", key=KEYS[who],
                           max_tokens=16, ignore_eos=True)
        with lock:
            finished.append(who)
        return status

    blockers = hold_places(served, {"acme": 2, "globex": 6})
    try:
        with ThreadPoolExecutor(80) as pool:
            jobs = [pool.submit(one, who) for i in range(40) for who in ("acme", "globex")]
            until_queue(served, (8, 80), 120, "all 80 queued behind the long requests")
            close(blockers)
            assert all(f.result() == 200 for f in jobs)
    finally:
        close(blockers)
    first = finished[:40]  # places given while both tenants waited (globex has 40)
    assert first.count("globex") >= 2 * first.count("acme"), finished
