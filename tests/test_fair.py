"""The fair waiting queue (virtual token counter) without an engine, the meter's durability,
and `zoo usage`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import zoo
from zoo.serve.fair import (
    DECODE_COST,
    PREFILL_COST,
    FairQueue,
    prefill_tokens,
    tenant_of,
    tenant_to_make_room,
)
from zoo.serve.meter import Meter
from zoo.serve.policy import salt_for


class Request:
    """What the queue reads of vLLM's Request (hashed by identity, as vLLM's is)."""

    def __init__(self, request_id: str, cache_salt: str, prompt_tokens: int = 5):
        self.request_id, self.cache_salt = request_id, cache_salt
        self.num_prompt_tokens, self.num_computed_tokens = prompt_tokens, 0


def request(tenant: str, i: int) -> Request:
    return Request(f"{tenant}-{i}", salt_for(tenant, "0123abcd"))


def serve(queue: FairQueue, steps: int, tokens_of=lambda r: 10) -> list[str]:
    """Admit one request per step and charge its tokens, as the scheduler would."""
    order = []
    for _ in range(steps):
        if not queue:
            break
        r = queue.peek_request()
        assert queue.pop_request() is r  # peek and pop agree
        order.append(tenant_of(r))
        queue.charge(tenant_of(r), tokens_of(r))
        queue.settle()
    return order


def test_the_tenant_travels_in_the_salt_the_middleware_sets():
    assert tenant_of(request("acme.corp", 1)) == "acme.corp"
    assert tenant_of(SimpleNamespace(cache_salt=None)) == "-"
    assert tenant_of(SimpleNamespace(cache_salt="client-chosen")) == "-"


def test_a_noisy_neighbour_does_not_make_others_wait_for_its_queue():
    queue = FairQueue(lambda t: 1.0)
    for i in range(300):
        queue.add_request(request("noisy", i))
    serve(queue, 50)  # noisy has been served a while
    queue.add_request(request("quiet", 0))
    assert serve(queue, 1) == ["quiet"]  # next in line, not behind 250 requests


def test_backlogged_tenants_are_served_in_proportion_to_their_weights():
    queue = FairQueue(lambda t: {"light": 1.0, "heavy": 3.0}[t])
    for i in range(4000):
        queue.add_request(request("light", i))
        queue.add_request(request("heavy", i))
    order = serve(queue, 2000)
    share = order.count("heavy") / order.count("light")
    assert abs(share - 3.0) / 3.0 <= 0.01, share


def test_the_requests_admitted_in_one_step_are_shared_by_weight():
    """vLLM pops several requests in one step before any token is charged: each counts for
    its prompt at once, so eight seats freed together go 6:2 to weights 3:1, not 8:0."""
    queue = FairQueue(lambda t: {"light": 1.0, "heavy": 3.0}[t])
    for i in range(20):
        queue.add_request(request("light", i))
        queue.add_request(request("heavy", i))
    step = [tenant_of(queue.pop_request()) for _ in range(8)]
    assert step.count("heavy") == 6, step
    queue.settle()  # the step's tokens are charged by the scheduler, the estimates go
    assert queue.in_step == {}


def test_an_idle_tenant_banks_no_credit_and_its_share_goes_to_others():
    queue = FairQueue(lambda t: 1.0)
    for i in range(100):
        queue.add_request(request("a", i))
    assert serve(queue, 60) == ["a"] * 60  # b idle: a gets everything (work-conserving)
    for i in range(100):
        queue.add_request(request("b", i))
    order = serve(queue, 40)  # b rejoins at a's counter: alternate, no burst of b
    assert order.count("b") in (20, 21)


def test_a_tenant_that_finds_the_queue_empty_banks_no_credit_either():
    """a is served alone until its queue empties; b arrives first into the empty queue,
    then a: b was lifted to a's counter, so they alternate rather than b taking 100 in a row."""
    queue = FairQueue(lambda t: 1.0)
    for i in range(100):
        queue.add_request(request("a", i))
    assert serve(queue, 100) == ["a"] * 100
    for i in range(50):
        queue.add_request(request("b", i))
        queue.add_request(request("a", 100 + i))
    assert serve(queue, 20).count("b") in (10, 11)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "pop", "prepend", "prepend_many", "remove",
                                           "remove_many"]), st.integers(0, 3)), max_size=40))
def test_one_tenant_queues_exactly_as_vllms_own_fcfs_queue(operations):
    """With one tenant the fair queue is vLLM's FCFS queue: the same operations, the same
    order (skipped requests come back through prepend_requests in vLLM's reversed order)."""
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    fair, fcfs = FairQueue(lambda t: 1.0), FCFSRequestQueue()
    made, out = iter(range(10_000)), []
    for operation, n in operations:
        if operation == "add":
            r = request("a", next(made))
            fair.add_request(r)
            fcfs.add_request(r)
        elif operation == "pop" and fcfs:
            assert fair.peek_request() is fcfs.peek_request()
            out.append(fair.pop_request())
            assert fcfs.pop_request() is out[-1]
        elif operation == "prepend" and out:
            fair.prepend_request(out[-1])
            fcfs.prepend_request(out.pop())
        elif operation == "prepend_many" and out:
            back = [out.pop() for _ in range(min(n + 1, len(out)))]
            fair.prepend_requests(back)
            fcfs.prepend_requests(back)
        elif operation == "remove" and fcfs:
            victim = list(fcfs)[n % len(fcfs)]
            fair.remove_request(victim)
            fcfs.remove_request(victim)
        elif operation == "remove_many" and fcfs:
            victims = list(fcfs)[::n + 1]
            fair.remove_requests(victims)
            fcfs.remove_requests(victims)
        assert list(fair) == list(fcfs) and len(fair) == len(fcfs) and bool(fair) == bool(fcfs)


def test_prompt_and_generated_tokens_are_charged_as_vtc_does():
    assert DECODE_COST == 2 * PREFILL_COST

    def state(prompt: int, output: int, computed: int):
        return SimpleNamespace(num_prompt_tokens=prompt, num_output_tokens=output,
                               num_tokens=prompt + output, num_computed_tokens=computed)
    assert prefill_tokens(state(10, 0, 0), 10) == 10  # a whole prompt
    assert prefill_tokens(state(10, 0, 4), 3) == 3  # a chunk of one
    assert prefill_tokens(state(10, 5, 14), 1) == 0  # a generated token
    # preempted after 5 tokens, computed again: 14 tokens are input, the 15th generates
    assert prefill_tokens(state(10, 5, 0), 15) == 14


def test_a_tenant_holding_every_place_makes_room_for_one_below_half_its_share():
    one = lambda t: 1.0  # noqa: E731
    assert tenant_to_make_room("b", Counter(a=64), ["a", "b"], one, 64) == "a"
    # a hundred tenants, each's share below one place: the first request still gets one
    waiting = [f"t{i}" for i in range(100)]
    assert tenant_to_make_room("t7", Counter(a=64), waiting, one, 64) == "a"
    # the one furthest above its share gives, not the first or the largest by name
    assert tenant_to_make_room("c", Counter(a=30, b=34), ["c"], one, 64) == "b"


def test_no_room_is_made_for_a_tenant_near_its_share_or_from_one_that_would_fall_below():
    one = lambda t: 1.0  # noqa: E731
    weights = {"light": 1.0, "heavy": 3.0}.get
    assert tenant_to_make_room("a", Counter(a=64), ["a"], one, 64) is None  # alone
    assert tenant_to_make_room("b", Counter(a=32, b=32), ["a", "b"], one, 64) is None
    # b is below its share (32) but not below half of it: the counters even that out
    assert tenant_to_make_room("b", Counter(a=48, b=16), ["a", "b"], one, 64) is None
    assert tenant_to_make_room("b", Counter(a=49, b=15), ["a", "b"], one, 64) == "a"
    assert tenant_to_make_room("light", Counter(light=2, heavy=6), ["light"], weights, 8) is None
    assert tenant_to_make_room("heavy", Counter(light=2, heavy=6), ["light"], weights, 8) is None
    assert tenant_to_make_room("heavy", Counter(light=3, heavy=5), ["light"], weights, 8) is None
    assert tenant_to_make_room("heavy", Counter(light=6, heavy=2), ["light"], weights, 8) == "light"
    # one place, a's share a half: giving it would leave a below its share
    assert tenant_to_make_room("b", Counter(a=1), ["a", "b"], one, 1) is None


def test_no_room_is_made_for_a_request_whose_adapter_has_no_slot():
    """vLLM skips a waiting request whose adapter cannot join the batch's adapters: making
    a place for it would only hand that place to someone else."""
    from zoo.serve.fair import FairScheduler

    def running(*ids):
        return [SimpleNamespace(lora_request=SimpleNamespace(lora_int_id=i) if i else None)
                for i in ids]

    def fits(lora_id, ids, max_loras=2):
        scheduler = SimpleNamespace(running=running(*ids),
                                    lora_config=SimpleNamespace(max_loras=max_loras))
        request = SimpleNamespace(lora_request=SimpleNamespace(lora_int_id=lora_id)
                                  if lora_id else None)
        return FairScheduler._adapter_fits(scheduler, request)

    assert fits(None, [1, 2])  # the base needs no slot
    assert fits(3, [1, None])  # a slot is free
    assert fits(2, [1, 2, 2])  # its adapter already runs
    assert not fits(3, [1, 2, 1])  # both slots taken by others


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 5), min_size=1),
       st.integers(1, 64), st.data())
def test_making_room_moves_places_towards_the_shares_and_stops(weights, places, data):
    """However the places start, each preemption takes one from a tenant that keeps at
    least its share and gives it to one below half its share; repeated for whoever is next
    in line, in any order, no more than ``places`` preemptions happen."""
    tenants = sorted(weights)
    held = data.draw(st.lists(st.sampled_from(tenants), min_size=places, max_size=places))
    seats = Counter(held)
    total = sum(weights.values())
    share = {t: places * weights[t] / total for t in tenants}
    preemptions = 0
    for _ in range(3 * places):
        next_in_line = data.draw(st.sampled_from(tenants))
        victim = tenant_to_make_room(next_in_line, seats, tenants, weights.get, places)
        if victim is not None:
            assert seats[next_in_line] < share[next_in_line] / 2
            assert seats[victim] - 1 >= share[victim]
            seats[victim] -= 1
            seats[next_in_line] += 1
            preemptions += 1
    assert preemptions <= places  # no place goes back and forth
    assert sum(seats.values()) == places


def test_metered_usage_survives_a_process_killed_right_after(tmp_path):
    """A row is durable when record() returns: kill -9 the writer, the row is there."""
    code = f"""
import os, sys
from pathlib import Path
from zoo.serve.meter import Meter
m = Meter(Path({str(tmp_path)!r}))
for i in range(200):
    m.record(f"r{{i}}", "acme", "acme/a:v1", 5, 7, 200)
    print(i, flush=True)
os.kill(os.getpid(), 9)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL
    acknowledged = len(done.stdout.split())
    rows = Meter(tmp_path).report(tenant="acme")
    assert rows[0]["requests"] == acknowledged == 200
    assert rows[0]["completion_tokens"] == 7 * 200


def test_dead_servers_free_their_inflight_rows(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    meter = Meter(tmp_path, server=int(dead.stdout))
    assert meter.admit("x", "acme", {"concurrent": 1}, 10).ok
    alive = Meter(tmp_path)
    assert alive.admit("y", "acme", {"concurrent": 1}, 10).ok  # the dead one's row is gone


def test_zoo_usage_reports_by_adapter_tenant_and_day(zoo_home):
    meter = Meter(zoo_home)
    meter.record(None, "acme", "acme/a:v1", 3, 4, 200)
    meter.record(None, "acme", "acme/a:v2", 3, 5, 200)
    meter.record(None, "globex", "tiny", 1, 2, 200)
    out = zoo("usage", "--by", "tenant", "--csv").stdout.splitlines()
    assert out[0] == "tenant,requests,prompt_tokens,completion_tokens,ok"
    assert out[1] == "acme,2,6,9,2" and out[2] == "globex,1,1,2,1"
    assert "acme/a:v2" in zoo("usage", "--tenant", "acme").stdout
    assert zoo("usage", "--since", "1d", "--by", "day").exit_code == 0
    bad = zoo("usage", "--since", "yesterday", ok=False)
    assert bad.exit_code == 1 and "neither a date nor a span" in bad.stderr
    assert json.loads(json.dumps(meter.report(by="day")))[0]["day"]
    assert os.path.exists(zoo_home / "usage.db")


def test_the_per_model_series_are_kept_for_the_pairs_used_last():
    """A server cycling through thousands of adapters keeps a bounded /metrics: the
    zoo_adapter_* series of the pairs used longest ago go (the meter keeps every request)."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from zoo.serve.middleware import RecentSeries

    registry = CollectorRegistry()
    counters = [Counter(name, name, ["model", "tenant"], registry=registry)
                for name in ("requests", "prompt", "completion")]
    series = RecentSeries(*counters, limit=3)
    for i in range(5):
        series.count(f"a{i}", "acme", prompt=10, completion=2)
    series.count("a2", "acme", prompt=10, completion=2)  # used again: the newest now
    series.count("a5", "acme", prompt=10, completion=2)
    text = generate_latest(registry).decode()
    kept = sorted({line.split('model="')[1].split('"')[0] for line in text.splitlines()
                   if line.startswith("requests_total{")})
    assert kept == ["a2", "a4", "a5"]
    assert 'requests_total{model="a2",tenant="acme"} 2.0' in text
    assert 'prompt_total{model="a5",tenant="acme"} 10.0' in text


@pytest.mark.parametrize("make, message", [
    (lambda path: path.write_bytes(b"not a database " * 100),
     "is not a usage meter zoo can read (file is not a database)"),
    (lambda path: sqlite3.connect(path).executescript(
        "CREATE TABLE monthly (tenant TEXT, spent REAL); INSERT INTO monthly VALUES ('a', 1);"),
     "is not zoo's usage meter: its tables monthly have other columns than zoo's"),
])
def test_a_usage_file_that_is_no_meter_is_refused_and_left_as_it_was(zoo_home, make, message):
    """It was "unexpected DatabaseError ... report it" from `zoo usage` (and from every
    request of a server)."""
    zoo_home.mkdir(parents=True, exist_ok=True)
    path = zoo_home / "usage.db"
    make(path)
    before = path.read_bytes()
    result = zoo("usage", ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert message in result.stderr and "Move it aside" in result.stderr
    assert path.read_bytes() == before
