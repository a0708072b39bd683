"""The serving gate without an engine: zoo's middleware and resolver in front of a fake
vLLM app that records what reaches it. Anything a tenant sends either is refused or
reaches the engine naming only the base or an adapter that tenant may use."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import resident_pages, zoo
from zoo.catalog.registry import Registry
from zoo.serve import policy as policy_module
from zoo.serve.middleware import MAX_BODY, ZooMiddleware
from zoo.serve.policy import ServePolicy, wrapped_modules

KEYS = {"acme": "sk-acme-0000001", "globex": "sk-globex-0000001", "ops": "sk-ops-00000001"}
ADAPTERS = ("acme/a", "globex/b")


class FakeVllm:
    """Records the model of every request that reaches it; answers like vLLM would."""

    def __init__(self):
        self.reached: list[tuple[str, bytes]] = []

    async def __call__(self, scope, receive, send):
        body = b""
        if scope["method"] == "POST":
            message = await receive()
            body = message.get("body", b"")
        self.reached.append((scope["path"], body))
        if scope["path"] == "/v1/models":
            payload = {"object": "list", "data": [
                {"id": "tiny", "object": "model", "root": "/srv/secret/zoo/bases/tiny",
                 "created": 1}]}
        else:
            payload = {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        data = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


@pytest.fixture
def gate(models, zoo_home, tmp_path):
    zoo("add", models.llama, "--name", "tiny")
    for i, name in enumerate(ADAPTERS):
        zoo("add", models.lora(f"gate{i}", seed=20 + i), "--name", name, "--base", "tiny")
    keys = tmp_path / "keys.json"
    write_keys(keys, KEYS)
    policy = ServePolicy(Registry(zoo_home), "tiny", 64, keys_path=keys)
    app = FakeVllm()
    return ZooMiddleware(app, policy), app, keys


def write_keys(path, keys: dict[str, str]) -> None:
    tenants = {t: {"keys": [k]} for t, k in keys.items()}
    if "ops" in tenants:
        tenants["ops"]["adapters"] = ["*"]
    path.write_text(json.dumps({"tenants": tenants}))


def call(middleware, path: str, body: bytes | None = None, key: str | None = None,
         headers=(), chunks: int = 1) -> tuple[int, dict]:
    return asyncio.run(call_async(middleware, path, body, key, headers, chunks))


async def call_async(middleware, path: str, body: bytes | None = None, key: str | None = None,
                     headers=(), chunks: int = 1) -> tuple[int, dict]:
    method = "GET" if body is None else "POST"
    hdrs = [(b"content-type", b"application/json"), *headers]
    if key:
        hdrs.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "path": path, "method": method, "headers": hdrs}
    pieces = [b""] if not body else [body[len(body) * i // chunks:len(body) * (i + 1) // chunks]
                                     for i in range(chunks)]
    queue = [{"type": "http.request", "body": p, "more_body": i + 1 < len(pieces)}
             for i, p in enumerate(pieces)]
    sent = []

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await middleware(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    raw = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(raw) if raw else {}


def chat(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


# 1. routes zoo does not vet are closed ------------------------------------------------

def test_sagemaker_invocations_cannot_reach_another_tenants_adapter(gate):
    middleware, app, _ = gate
    status, body = call(middleware, "/invocations", chat("tiny"), KEYS["acme"],
                        headers=[(b"x-amzn-sagemaker-adapter-identifier", b"globex/b")])
    assert status == 403 and "not served by zoo" in body["error"]["message"]
    for path in ("/v1/responses/resp_123", "/pooling", "/v1/audio/transcriptions",
                 "/v1/batches", "/score", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
                 "/adapters", "/adapters/acme/a"):
        assert call(middleware, path, chat("tiny"), KEYS["ops"])[0] == 403, path
    assert app.reached == []


def test_resolver_loads_only_for_a_vetted_request_of_a_tenant_that_may_use_it(gate):
    from zoo.serve.resolver import RegistryResolver

    middleware, _, _ = gate
    resolver = RegistryResolver(middleware.policy)
    acme = middleware.policy.tenant_for(KEYS["acme"])

    def resolve(tenant, name):
        async def run():
            if tenant is not policy_module.NOT_VETTED:
                policy_module.REQUEST_TENANT.set(tenant)
            return await resolver.resolve_lora("tiny", name)
        return asyncio.run(run())

    assert resolve(policy_module.NOT_VETTED, "acme/a") is None  # no middleware decision
    assert resolve(acme, "globex/b") is None
    loaded = resolve(acme, "acme/a")
    assert loaded is not None and loaded.lora_name == "acme/a"


# 5. /metrics needs an operator's key --------------------------------------------------

def test_metrics_need_an_operator_key(gate):
    middleware, app, _ = gate
    assert call(middleware, "/metrics")[0] == 401
    assert call(middleware, "/metrics", key=KEYS["acme"])[0] == 403
    assert call(middleware, "/metrics", key=KEYS["ops"])[0] == 200
    assert [p for p, _ in app.reached] == ["/metrics"]


# 9. smaller items ---------------------------------------------------------------------

def test_a_body_over_the_limit_is_413_not_cut(gate):
    middleware, app, _ = gate
    big = b'{"model": "tiny", "prompt": "' + b"x" * (MAX_BODY + 10) + b'"}'
    status, body = call(middleware, "/v1/completions", big, KEYS["acme"], chunks=8)
    assert status == 413 and "larger than" in body["error"]["message"]
    assert app.reached == []


def test_models_list_shows_no_server_paths(gate, zoo_home):
    middleware, _, _ = gate
    status, listing = call(middleware, "/v1/models", key=KEYS["ops"])
    assert status == 200
    text = json.dumps(listing)
    assert "/srv/secret" not in text and str(zoo_home) not in text
    assert {c["id"] for c in listing["data"]} == {"tiny", *ADAPTERS}


def test_usage_is_counted_on_every_model_route(gate):
    middleware, _, _ = gate
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"):
        assert call(middleware, path, chat("acme/a"), KEYS["acme"])[0] == 200
    rows = call(middleware, "/zoo/usage", key=KEYS["acme"])[1]["usage"]
    assert rows == [{"model": "acme/a:v1", "tenant": "acme", "requests": 4, "prompt_tokens": 12,
                     "completion_tokens": 8, "ok": 4}]
    # durable in the home: another middleware (a restart, a replica) reads the same rows
    other = ZooMiddleware(FakeVllm(), middleware.policy)
    assert call(other, "/zoo/usage", key=KEYS["acme"])[1]["usage"] == rows


@pytest.mark.parametrize("cookie", ["acme|x|1|\xe9", "acme|x|1|00", "|||", "\xe9\xe9", ""])
def test_a_junk_session_cookie_signs_the_visitor_out(gate, cookie):
    """The pages in front of this middleware: a session cookie zoo did not sign is a
    redirect to sign in, whatever it holds (a non-ASCII one crashed the page)."""
    from zoo.ui.web import Pages

    middleware, _, _ = gate
    pages = Pages(middleware, middleware.policy)
    header = (b"cookie", f"zoo_session={cookie}".encode("latin-1"))
    assert call(pages, "/zoo/ui/", headers=[header]) == (303, {})


def test_a_revoked_key_stops_working_without_a_restart(gate):
    middleware, _, keys = gate
    assert call(middleware, "/v1/completions", chat("acme/a"), KEYS["acme"])[0] == 200
    time.sleep(0.01)
    write_keys(keys, {k: v for k, v in KEYS.items() if k != "acme"})
    os.utime(keys, ns=(time.time_ns(), time.time_ns()))
    assert call(middleware, "/v1/completions", chat("acme/a"), KEYS["acme"])[0] == 401
    keys.write_text("{not json")  # a broken keys file locks everyone out, never opens up
    assert call(middleware, "/v1/completions", chat("tiny"), KEYS["ops"])[0] == 401


def test_zoo_keys_revoke_ends_one_key_at_the_next_request_and_list_shows_no_secret(gate):
    middleware, _, keys = gate
    old = KEYS["acme"]
    new = zoo("keys", "add", "acme", "--file", keys).stdout.strip()  # the rotation's new key
    listed = zoo("keys", "list", "--file", keys, "--json")
    assert old not in listed.stdout and new not in listed.stdout  # fingerprints only
    acme = next(t for t in json.loads(listed.stdout) if t["tenant"] == "acme")
    assert acme["keys"] == [policy_module.fingerprint(old), policy_module.fingerprint(new)]
    for key in (old, new):
        assert call(middleware, "/v1/completions", chat("acme/a"), key)[0] == 200
    time.sleep(0.01)
    refused = zoo("keys", "revoke", "acme", "--file", keys, "--key", "0123abcd", ok=False)
    assert refused.exit_code == 1 and "no key of 'acme'" in refused.stderr
    wrong = zoo("keys", "revoke", "acme", "--file", keys, "--key", "sk-not-a-key-at-all",
                ok=False)
    assert "the key given" in wrong.stderr and "sk-not" not in wrong.stderr  # never echoed
    zoo("keys", "revoke", "acme", "--file", keys, "--key", acme["keys"][0][:8])
    os.utime(keys, ns=(time.time_ns(), time.time_ns()))
    assert call(middleware, "/v1/completions", chat("acme/a"), old)[0] == 401
    assert call(middleware, "/v1/completions", chat("acme/a"), new)[0] == 200
    last = zoo("keys", "revoke", "acme", "--file", keys, "--key", new, ok=False)
    assert "'acme' would have no key left" in last.stderr  # a tenant is never keyless
    assert "revoked 1 key of acme and the tenant" in zoo(
        "keys", "revoke", "acme", "--file", keys, "--all").stdout
    os.utime(keys, ns=(time.time_ns() + 10**7, time.time_ns() + 10**7))
    assert call(middleware, "/v1/completions", chat("acme/a"), new)[0] == 401
    assert call(middleware, "/v1/completions", chat("globex/b"), KEYS["globex"])[0] == 200
    assert "globex" in zoo("keys", "list", "--file", keys).stdout


# property: whatever acme sends, the engine sees only the base or acme's adapters -------

NAMES = st.sampled_from(["tiny", "acme/a", "globex/b", "Globex/b", " globex/b", "globex/b\n",
                         "acme/a/../../globex/b", "globex/*", "acme/*", "", "acme/nope"])
# the fields the middleware reads itself, beside one it does not
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "user", "cache_salt", "x"]
BODIES = st.one_of(
    NAMES.map(chat),
    st.tuples(NAMES, NAMES).map(  # duplicate keys: JSON parsers keep the last one
        lambda pair: f'{{"model": {json.dumps(pair[0])}, "model": {json.dumps(pair[1])}}}'.encode()),
    st.binary(max_size=64),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8) | NAMES,
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3),
                 max_leaves=8).map(lambda v: json.dumps(v).encode()),
)
PROPERTY_EXAMPLES = 200


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions",
                                          "/v1/responses", "/tokenize", "/invocations",
                                          "/v1/embeddings/../chat/completions"]))
@example(body=b'{"max_tokens": 9223372036854775800}', path="/v1/chat/completions")  # SQLite's
@example(body=b'{"model": "globex/b", "n": ' + b"1" * 5000 + b"}",  # past Python's json
         path="/v1/chat/completions")
def test_fuzzed_requests_reach_the_engine_only_for_what_the_tenant_may_use(gate, body, path):
    middleware, app, _ = gate
    app.reached.clear()
    status, _ = call(middleware, path, body, KEYS["acme"])
    for _, seen in app.reached:
        try:
            model = json.loads(seen).get("model")
        except (ValueError, AttributeError, UnicodeDecodeError):
            continue  # not a JSON object: vLLM refuses it before choosing a model
        # an empty or absent model is the base to vLLM; acme/a reaches it as its version
        assert model in (None, "", "tiny", "acme/a:v1") or not isinstance(model, str), \
            (status, seen)


# versions: which one answers, the canary share, and the prefix cache's salt ------------

def _reached_model(app) -> dict:
    return json.loads(app.reached[-1][1])


def test_a_name_reaches_the_engine_as_the_version_that_answers(gate, models, tmp_path):
    middleware, app, _ = gate
    zoo("add", models.lora("gate-v2", seed=40), "--name", "acme/a", "--new-version")
    assert call(middleware, "/v1/chat/completions", chat("acme/a"), KEYS["acme"])[0] == 200
    assert _reached_model(app)["model"] == "acme/a:v1"  # v2 serves nobody until promoted
    assert call(middleware, "/v1/chat/completions", chat("acme/a:v2"), KEYS["acme"])[0] == 200
    assert _reached_model(app)["model"] == "acme/a:v2"  # asked by number
    assert call(middleware, "/v1/chat/completions", chat("acme/a:v9"), KEYS["acme"])[0] == 404
    assert call(middleware, "/v1/chat/completions", chat("acme/a:v2"), KEYS["globex"])[0] == 403
    zoo("promote", "acme/a", "v2", "--force")
    assert call(middleware, "/v1/chat/completions", chat("acme/a"), KEYS["acme"])[0] == 200
    assert _reached_model(app)["model"] == "acme/a:v2"  # the next request after promote
    assert call(middleware, "/v1/chat/completions", chat("acme/a:previous"),
                KEYS["acme"])[0] == 200
    assert _reached_model(app)["model"] == "acme/a:v1"
    names = {m["id"] for m in call(middleware, "/v1/models", None, KEYS["acme"])[1]["data"]}
    assert names == {"tiny", "acme/a"}  # names, not every version ...
    scope_query = _list_with_versions(middleware, KEYS["acme"])
    assert {"acme/a:v1", "acme/a:v2"} <= scope_query  # ... unless asked


def test_an_adapter_training_a_module_the_engine_does_not_adapt_is_refused(gate, models):
    """With --lora-targets catalog zoo serve gives LoRA layers to what the catalog trains
    only (``lora_layers``): vLLM would drop an adapter's weights for any other module
    without a word, so such an adapter (or version) is refused with the reason and the way
    out, and never loaded."""
    middleware, app, _ = gate
    assert wrapped_modules("") is None and wrapped_modules(None) is None
    assert wrapped_modules("qkv_proj,down_proj") == {"qkv_proj", "q_proj", "k_proj", "v_proj",
                                                     "down_proj"}
    # vLLM wraps q, k and v as one layer: naming a part wraps all three
    assert wrapped_modules("q_proj,v_proj") == {"qkv_proj", "q_proj", "k_proj", "v_proj"}
    middleware.policy.wrapped = wrapped_modules("q_proj,v_proj")
    zoo("add", models.lora("gate-wide", seed=41, target_modules=["q_proj", "v_proj", "o_proj"]),
        "--name", "acme/wide", "--base", "tiny")
    zoo("add", models.lora("gate-wide", seed=41, target_modules=["q_proj", "v_proj", "o_proj"]),
        "--name", "acme/a", "--new-version")
    reached = len(app.reached)
    status, body = call(middleware, "/v1/chat/completions", chat("acme/wide"), KEYS["acme"])
    assert status == 400 and "trains o_proj" in body["error"]["message"]
    assert "k_proj, q_proj, qkv_proj, v_proj" in body["error"]["message"]
    assert "--lora-targets all" in body["error"]["message"]
    assert body["error"]["message"].endswith("restart zoo serve with --lora-targets all.")
    assert call(middleware, "/v1/chat/completions", chat("acme/a:v2"), KEYS["acme"])[0] == 400
    assert len(app.reached) == reached  # neither reached the engine
    assert call(middleware, "/v1/chat/completions", chat("acme/a"), KEYS["acme"])[0] == 200
    middleware.policy.wrapped = wrapped_modules("qkv_proj,o_proj")  # vLLM's own names
    assert call(middleware, "/v1/chat/completions", chat("acme/wide"), KEYS["acme"])[0] == 200
    middleware.policy.wrapped = None  # every module: nothing is refused for its targets
    assert call(middleware, "/v1/chat/completions", chat("acme/a:v2"), KEYS["acme"])[0] == 200


def _list_with_versions(middleware, key) -> set[str]:
    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/models", "method": "GET", "query_string":
             b"versions=true", "headers": [(b"authorization", f"Bearer {key}".encode())]}
    asyncio.run(middleware(scope, receive, send))
    raw = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {m["id"] for m in json.loads(raw)["data"]}


def test_a_canary_gets_its_share_sticky_per_end_user(gate, models):
    middleware, app, _ = gate
    zoo("add", models.lora("gate-v2", seed=40), "--name", "acme/a", "--new-version")
    zoo("promote", "acme/a", "v2", "--canary", "20", "--force")
    answered = {}
    for i in range(1000):
        body = json.dumps({"model": "acme/a", "user": f"user-{i}",
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        assert call(middleware, "/v1/chat/completions", body, KEYS["acme"])[0] == 200
        answered[i] = _reached_model(app)["model"]
    share = sum(v == "acme/a:v2" for v in answered.values()) / len(answered)
    assert abs(share - 0.20) <= 0.03, share
    for i in range(0, 1000, 97):  # one person stays on one version
        body = json.dumps({"model": "acme/a", "user": f"user-{i}"}).encode()
        call(middleware, "/v1/chat/completions", body, KEYS["acme"])
        assert _reached_model(app)["model"] == answered[i]


def test_cached_prefixes_never_cross_tenants_or_weights(gate, models):
    """The engine's prefix cache is keyed by the salt zoo sets: one per tenant and per set of
    weights, whatever the client sent."""
    middleware, app, _ = gate

    def salt(model, key, client_salt=None):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        if client_salt:
            body["cache_salt"] = client_salt
        assert call(middleware, "/v1/chat/completions", json.dumps(body).encode(), key)[0] == 200
        return _reached_model(app)["cache_salt"]

    acme_base, globex_base = salt("tiny", KEYS["acme"]), salt("tiny", KEYS["globex"])
    assert acme_base != globex_base and acme_base == salt("tiny", KEYS["acme"])
    assert salt("tiny", KEYS["globex"], client_salt=acme_base) == globex_base  # overridden
    v1 = salt("acme/a", KEYS["acme"])
    zoo("add", models.lora("gate-v2", seed=40), "--name", "acme/a", "--new-version")
    assert salt("acme/a:v2", KEYS["acme"]) != v1 != acme_base
    # the same name removed and added again with other weights: other cache keys
    zoo("rm", "acme/a")
    zoo("add", models.lora("gate-v2", seed=40), "--name", "acme/a", "--base", "tiny")
    assert salt("acme/a", KEYS["acme"]) != v1


def test_the_response_says_which_version_answered(gate):
    middleware, _, _ = gate
    _, headers = _call_with_headers(middleware, chat("acme/a"), KEYS["acme"])
    assert headers["x-zoo-model"] == "acme/a:v1"


# limits per tenant -------------------------------------------------------------------

def _limited(gate, limits: dict, weight: float | None = None):
    middleware, app, keys = gate
    data = json.loads(keys.read_text())
    data["tenants"]["acme"]["limits"] = limits
    keys.write_text(json.dumps(data))
    time.sleep(0.01)
    return middleware, app


def _call_with_headers(middleware, body: bytes, key: str):
    sent = []
    scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST",
             "headers": [(b"authorization", f"Bearer {key}".encode())]}
    queue = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


def test_requests_per_minute_are_limited_across_a_tenants_keys_and_adapters(gate):
    middleware, app = _limited(gate, {"requests_per_minute": 3})
    statuses = [_call_with_headers(middleware, chat(m), KEYS["acme"])
                for m in ("acme/a", "tiny", "acme/a", "tiny")]
    assert [s for s, _ in statuses] == [200, 200, 200, 429]
    status, headers = statuses[-1]
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 0 < int(headers["retry-after"]) <= 60
    assert statuses[0][1]["x-ratelimit-remaining-requests"] == "2"
    reached = len(app.reached)
    _call_with_headers(middleware, chat("acme/a"), KEYS["acme"])
    assert len(app.reached) == reached  # refused before any work reached the engine
    assert _call_with_headers(middleware, chat("globex/b"), KEYS["globex"])[0] == 200


def test_tokens_are_limited_per_minute_and_per_month(gate):
    middleware, _ = _limited(gate, {"tokens_per_minute": 400})
    body = json.dumps({"model": "acme/a", "max_tokens": 150,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    # each reserves its prompt (~25 tokens) and max_tokens, then uses what it used (5)
    assert _call_with_headers(middleware, body, KEYS["acme"])[0] == 200
    big = json.dumps({"model": "acme/a", "max_tokens": 500,
                      "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, headers = _call_with_headers(middleware, big, KEYS["acme"])
    assert status == 429 and headers["x-ratelimit-limit-tokens"] == "400"
    middleware, _ = _limited(gate, {"tokens_per_month": 300})
    assert _call_with_headers(middleware, body, KEYS["acme"])[0] == 200  # 5 used + 187 asked
    status, headers = _call_with_headers(middleware, big, KEYS["acme"])
    assert status == 429 and int(headers["retry-after"]) > 60  # the month's end


def test_a_max_tokens_past_any_engine_is_counted_not_a_crash(gate):
    """A max_tokens larger than the meter's 64-bit integers is reserved as 2**31 tokens:
    over a tenant's limit a 429, without one it reaches the engine as sent."""
    body = json.dumps({"model": "acme/a", "max_tokens": 10**20,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    middleware, app = _limited(gate, {"tokens_per_minute": 400})
    status, headers = _call_with_headers(middleware, body, KEYS["acme"])
    assert status == 429 and headers["x-ratelimit-remaining-tokens"] == "0"
    middleware, app = _limited(gate, {})
    app.reached.clear()
    assert call(middleware, "/v1/chat/completions", body, KEYS["acme"])[0] == 200
    assert json.loads(app.reached[-1][1])["max_tokens"] == 10**20  # vLLM caps it at the context


def test_concurrent_requests_are_limited_and_freed(gate, zoo_home):
    from zoo.serve.meter import Meter

    middleware, _ = _limited(gate, {"concurrent": 2})
    meter = Meter(zoo_home)
    for i in range(2):  # two of acme's requests in flight (as another replica would hold)
        assert meter.admit(f"held-{i}", "acme", {"concurrent": 2}, 10).ok
    assert _call_with_headers(middleware, chat("acme/a"), KEYS["acme"])[0] == 429
    meter.record("held-0", "acme", "acme/a:v1", 1, 1, 200)
    assert _call_with_headers(middleware, chat("acme/a"), KEYS["acme"])[0] == 200
    # the held one and the admitted one are metered; the refused one never reached vLLM
    assert sum(r["requests"] for r in meter.report(tenant="acme")) == 2


def test_a_new_adapters_files_are_hashed_beside_the_event_loop(gate, monkeypatch):
    """The first request for an adapter whose files no hash cache knows has them hashed in
    a thread: a request for the base meanwhile is answered without waiting for it, and a
    file changed since it was registered is still refused."""
    import threading

    from zoo.catalog import integrity

    middleware, app, _ = gate
    integrity.forget_hashes()  # as for an adapter just added
    release, hashing_threads = threading.Event(), []
    hash_file = integrity.sha256_file

    def slow_hash(path):
        hashing_threads.append(threading.current_thread())
        release.wait(10)  # until the base's request is answered (on the loop: never)
        return hash_file(path)

    monkeypatch.setattr(integrity, "sha256_file", slow_hash)

    async def both():
        adapter = asyncio.create_task(call_async(middleware, "/v1/chat/completions",
                                                 chat("acme/a"), KEYS["acme"]))
        while not hashing_threads:
            await asyncio.sleep(0.01)
        base = await call_async(middleware, "/v1/chat/completions", chat("tiny"), KEYS["acme"])
        answered_first = not release.is_set()
        release.set()
        return base, answered_first, await adapter

    base, answered_first, adapter = asyncio.run(both())
    assert base[0] == 200 and adapter[0] == 200 and answered_first
    assert threading.main_thread() not in hashing_threads
    assert [json.loads(body)["model"] for _, body in app.reached] == ["tiny", "acme/a:v1"]
    # known now: the next request checks on the loop, and changed content is refused
    hashing_threads.clear()
    assert call(middleware, "/v1/chat/completions", chat("acme/a"), KEYS["acme"])[0] == 200
    assert hashing_threads == []
    weights = middleware.policy.adapter("acme/a").path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.unlink()
    weights.write_bytes(bytes(data))
    status, body = call(middleware, "/v1/chat/completions", chat("acme/a"), KEYS["acme"])
    assert status == 422 and "files changed" in body["error"]["message"]


def test_a_changed_registry_is_read_beside_the_event_loop_once(gate, monkeypatch):
    """After a change to the registry, the next requests wait for one read of it, made in
    a thread: the event loop runs meanwhile (streams go on), and they all see the change."""
    import threading

    middleware, app, _ = gate
    assert call(middleware, "/v1/chat/completions", chat("acme/a"), KEYS["acme"])[0] == 200
    zoo("rm", "acme/a")
    release, reading_threads = threading.Event(), []
    load = Registry.load

    def slow_load(registry):
        reading_threads.append(threading.current_thread())
        release.wait(10)  # until the loop ran meanwhile (on the loop: never)
        return load(registry)

    monkeypatch.setattr(Registry, "load", slow_load)

    async def meanwhile():
        requests = [asyncio.create_task(call_async(middleware, "/v1/chat/completions",
                                                   chat(model), KEYS["acme"]))
                    for model in ("acme/a", "tiny", "acme/a")]
        while not reading_threads:
            await asyncio.sleep(0.01)
        loop_ran = not release.is_set()
        release.set()
        return loop_ran, await asyncio.gather(*requests)

    loop_ran, answers = asyncio.run(meanwhile())
    assert loop_ran and len(reading_threads) == 1
    assert threading.main_thread() not in reading_threads
    assert [status for status, _ in answers] == [404, 200, 404]
    assert json.loads(app.reached[-1][1])["model"] == "tiny"


def test_listing_models_checks_every_adapters_files_beside_the_event_loop(gate, monkeypatch):
    """/v1/models and /zoo/engine check each served adapter's files (a stat a file, 0.2 s
    for 10,000 adapters): in a thread, not on the loop every stream shares."""
    import threading

    middleware, _, _ = gate
    threads, served = [], middleware.policy.served_adapters

    def watched():
        threads.append(threading.current_thread())
        return served()

    monkeypatch.setattr(middleware.policy, "served_adapters", watched)
    status, listing = call(middleware, "/v1/models", key=KEYS["acme"])
    assert status == 200 and [m["id"] for m in listing["data"]] == ["tiny", "acme/a"]
    status, engine = call(middleware, "/zoo/engine", key=KEYS["ops"])
    assert status == 200 and set(engine["adapter_file_bytes"]) == set(ADAPTERS)
    assert len(threads) == 2 and threading.main_thread() not in threads


def test_the_resolver_shares_the_middlewares_policy(gate, zoo_home, monkeypatch):
    """One read of a changed registry per server process: vLLM's resolver (which loads
    an adapter on its first use) asks the policy whose registry the middleware reads."""
    from zoo.serve.resolver import RegistryResolver

    monkeypatch.setenv(policy_module.HOME_VARIABLE, str(zoo_home))
    monkeypatch.setenv(policy_module.BASE_VARIABLE, "tiny")
    policy_module.shared_policy.cache_clear()
    try:
        middleware = ZooMiddleware(FakeVllm())
        assert RegistryResolver.from_environment().policy is middleware.policy
    finally:
        policy_module.shared_policy.cache_clear()


def test_a_first_used_adapters_files_are_read_ahead_until_the_engine_loaded_them(
        gate, monkeypatch):
    """The engine core reads an adapter's files on its first request: the middleware asks
    the kernel to read them ahead then (the registered files, where the server reads
    them), not for the base, and not again once the resolver has loaded that content."""
    from zoo.serve import middleware as middleware_module

    middleware, app, _ = gate
    asked = []
    monkeypatch.setattr(middleware_module, "read_ahead", lambda paths: asked.append(
        sorted(str(p) for p in paths)))
    monkeypatch.delitem(policy_module.LOADED_HASHES, "acme/a:v1", raising=False)
    assert call(middleware, "/v1/chat/completions", chat("tiny"), KEYS["acme"])[0] == 200
    assert asked == []
    assert call(middleware, "/v1/chat/completions", chat("acme/a"), KEYS["acme"])[0] == 200
    decision = middleware.policy.adapter("acme/a")
    assert asked == [sorted(str(decision.path / name) for name in decision.files)]
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(decision.files)
    monkeypatch.setitem(policy_module.LOADED_HASHES, "acme/a:v1", decision.content_hash)
    assert call(middleware, "/v1/chat/completions", chat("acme/a"), KEYS["acme"])[0] == 200
    assert len(asked) == 1  # loaded: the engine has it
    monkeypatch.setitem(policy_module.LOADED_HASHES, "acme/a:v1", "sha256:other")
    assert call(middleware, "/v1/chat/completions", chat("acme/a"), KEYS["acme"])[0] == 200
    assert len(asked) == 2  # other content loaded under the name: read the new files


def test_read_ahead_brings_a_file_into_the_page_cache(tmp_path):
    """A file the page cache let go is in it soon after read_ahead, without being read
    (``mincore`` on a mapping of it); a missing file is skipped."""
    import ctypes
    import mmap

    from zoo.core.files import read_ahead

    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(4 << 20))
    pages = (4 << 20) // mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    fd = os.open(path, os.O_RDONLY)
    address = libc.mmap(None, 4 << 20, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)

    def cached() -> int:
        return resident_pages(address, 4 << 20)

    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cached() > pages // 4:
            pytest.skip("this filesystem keeps the file in memory (tmpfs?): nothing to read")
        read_ahead([tmp_path / "missing", path])
        deadline = time.monotonic() + 10
        while cached() < pages and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cached() == pages
    finally:
        libc.munmap(address, 4 << 20)
        os.close(fd)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "key", "fingerprint", "all"]),
                          st.sampled_from(["acme", "globex"])), max_size=12))
def test_adding_and_revoking_keys_in_any_order_leaves_exactly_the_live_keys(operations):
    """Whatever the order of `zoo keys add` and `revoke`: the file loads, every tenant in
    it has a key, each live key is held by its tenant and each revoked one by no one."""
    import tempfile
    from pathlib import Path

    from zoo.errors import ZooError
    from zoo.serve.policy import add_key, fingerprint, load_tenants, revoke_key

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "keys.json"
        live: dict[str, list[str]] = {}
        revoked: list[str] = []
        for operation, tenant in operations:
            keys = live.get(tenant, [])
            if operation == "add":
                live.setdefault(tenant, []).append(add_key(path, tenant))
                continue
            named = None if operation == "all" else \
                (keys[0] if operation == "key" else fingerprint(keys[0])[:8]) if keys else \
                "sk-no-such-key"
            allowed = bool(keys) and (operation == "all" or len(keys) > 1)
            try:
                removed = revoke_key(path, tenant, named)
            except ZooError:
                assert not allowed, (operation, tenant, len(keys))
                continue
            assert allowed and removed == (len(keys) if operation == "all" else 1)
            revoked += keys if operation == "all" else [keys[0]]
            live[tenant] = [] if operation == "all" else keys[1:]
            live = {t: k for t, k in live.items() if k}
        tenants = load_tenants(path) if path.exists() else []
        assert {t.name for t in tenants} == set(live)
        for t in tenants:
            assert t.keys and all(t.holds(k) for k in live[t.name])
            assert not any(t.holds(k) for k in revoked)
