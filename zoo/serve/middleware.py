"""The ASGI middleware ``zoo serve`` puts in front of vLLM's OpenAI server (``--middleware``).

For every request it

* authenticates the API key when a keys file is set (401) and keeps each
  tenant to the base and its own adapters (403);
* answers 404 for a model that is neither the base nor a servable adapter of
  it in the registry (never the base's answer instead), 422 for an adapter
  whose files changed;
* unloads adapters that were removed from the registry, and lists the
  registry's adapters in ``/v1/models``;
* counts requests and tokens per adapter and tenant (``/zoo/usage`` as JSON,
  and ``zoo_*`` series on vLLM's own ``/metrics``);
* refuses vLLM's runtime load/unload endpoints: adapters come from the registry;
* is closed by default: a route zoo does not vet (one that could name an
  adapter some other way than the body's ``model``, such as ``/invocations``
  with its adapter header, or read stored state) is a 403, and ``/metrics``
  needs an operator's key (a tenant whose adapters are ``*``);
* hands the request's tenant to the resolver (a context variable) and unloads
  an adapter whose name was re-registered with other content before serving it;
* asks the kernel to read a newly used adapter's files ahead (the engine core reads
  them next, and a file the page cache let go took it 4-9 ms instead of 1-2).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zoo.catalog.integrity import cached_hash
from zoo.catalog.versions import label, record_in_use
from zoo.core.files import read_ahead
from zoo.core.process import identity
from zoo.core.tables import is_count
from zoo.serve.policy import (
    ANONYMOUS,
    LOAD_FAILURES,
    LOADED_HASHES,
    REQUEST_TENANT,
    Decision,
    ServePolicy,
    Tenant,
    salt_for,
    shared_policy,
)

logger = logging.getLogger("zoo.serve")
OPEN_PATHS = ("/health", "/ping", "/version")
ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters")
# Routes whose only adapter selector is the JSON body's "model", which zoo checks;
# every other route is closed (403) rather than trusted.
MODEL_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
               "/v1/messages", "/tokenize", "/detokenize")
ZOO_PATHS = ("/zoo/usage", "/zoo/engine", "/v1/models", "/metrics")
MAX_BODY = 32 * 1024 * 1024
VERSION_HEADER = b"x-zoo-model"  # which model, which adapter version, answered


class Usage:
    """Every request's usage, durable in the home's meter (``meter.py``: SQLite, shared by
    the replicas of a home, read by ``zoo usage``) and mirrored to this process's
    Prometheus counters. The meter's connection lives in one thread of its own, so the
    event loop never waits on the disk."""

    def __init__(self, home: Path):
        self.home = home
        self._prometheus = _prometheus_counters()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="zoo-meter")
        self._local = threading.local()

    def _meter(self):
        from zoo.serve.meter import Meter

        meter = getattr(self._local, "meter", None)
        if meter is None:
            meter = self._local.meter = Meter(self.home)
        return meter

    async def call(self, method: str, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, lambda: getattr(self._meter(), method)(*args, **kwargs))

    async def record(self, request_id: str | None, model: str, tenant: str, prompt: int,
                     completion: int, status: int) -> None:
        await self.call("record", request_id, tenant, model, prompt, completion, status)
        if self._prometheus and status == 200:
            self._prometheus.count(model, tenant, prompt, completion)

    async def as_json(self, tenant: str | None = None,
                      here: bool = False) -> list[dict[str, Any]]:
        """The home's usage (every server sharing it), or ``here``: this server's alone."""
        return await self.call("report", tenant=tenant, by="adapter",
                               server=identity() if here else None)


SERIES_KEPT = 1024  # (model, tenant) pairs in the zoo_adapter_* series


class RecentSeries:
    """zoo's per-model Prometheus counters, for the ``limit`` (model, tenant) pairs used
    most recently: a server cycling through thousands of adapters would otherwise keep a
    series for every one it ever served, growing its memory and every /metrics scrape
    (4.7 MB after 8,000 adapters). A pair that comes back starts again from 0, which
    Prometheus reads as a counter reset; the meter in the home keeps every request."""

    def __init__(self, requests, prompt_tokens, completion_tokens, limit: int = SERIES_KEPT):
        self.counters = (requests, prompt_tokens, completion_tokens)
        self.limit = limit
        self.pairs: OrderedDict[tuple[str, str], None] = OrderedDict()

    def count(self, model: str, tenant: str, prompt: int, completion: int) -> None:
        requests, prompt_tokens, completion_tokens = self.counters
        requests.labels(model, tenant).inc()
        prompt_tokens.labels(model, tenant).inc(prompt)
        completion_tokens.labels(model, tenant).inc(completion)
        self.pairs[(model, tenant)] = None
        self.pairs.move_to_end((model, tenant))
        while len(self.pairs) > self.limit:
            (old_model, old_tenant), _ = self.pairs.popitem(last=False)
            for counter in self.counters:
                counter.remove(old_model, old_tenant)


@functools.cache
def _prometheus_counters() -> RecentSeries | None:
    """The zoo_* series, registered once per process (a registry refuses duplicates)."""
    try:
        from prometheus_client import Counter
    except ImportError:  # pragma: no cover - vLLM depends on it
        return None
    labels = ["model", "tenant"]
    return RecentSeries(
        Counter("zoo_adapter_requests", "Requests per served model", labels),
        Counter("zoo_adapter_prompt_tokens", "Prompt tokens per served model", labels),
        Counter("zoo_adapter_completion_tokens", "Completion tokens per served model", labels))


class ZooMiddleware:
    """Pure ASGI middleware (streams pass through untouched, only observed)."""

    def __init__(self, app, policy: ServePolicy | None = None):
        self.app = app
        self.policy = policy or shared_policy()
        self.policy.record_engine()
        self.usage = Usage(self.policy.registry.home)
        self._followed = None  # the registry read the engine's adapters were checked against
        self._reading: asyncio.Task | None = None  # a read of a changed registry, in a thread
        self._secret = secrets.token_bytes(32)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        if path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if path in ADMIN_PATHS or path.startswith("/adapters/"):
            return await _send_error(send, Decision(403, "Adapters are loaded from the zoo "
                                                         "registry: use 'zoo add' or 'zoo rm'."))
        if path not in MODEL_PATHS and path not in ZOO_PATHS:
            return await _send_error(send, Decision(403, f"`{path}` is not served by zoo: "
                                                         "it is not checked for tenants."))
        tenant = None
        if self.policy.current_tenants() is not None:
            tenant = self.policy.tenant_for(_bearer(scope))
            if tenant is None:
                return await _send_error(send, Decision(401, "Missing or unknown API key."))
        REQUEST_TENANT.set(tenant)
        if path == "/metrics":
            if tenant is not None and not tenant.operator:
                return await _send_error(send, Decision(403, "Metrics name every tenant's "
                                                             "adapters: an operator key reads them."))
            return await self.app(scope, receive, send)
        if path == "/zoo/usage":
            here = b"server=this" in scope.get("query_string", b"").split(b"&")
            rows = await self.usage.as_json(tenant.name if tenant else None, here=here)
            return await _send_json(send, 200, {"usage": rows})
        if path == "/zoo/engine":
            return await _send_json(send, 200,
                                    await asyncio.to_thread(self._engine_report, tenant))
        await self._follow_registry(scope)

        if path == "/v1/models":
            return await self._list_models(scope, receive, send, tenant)
        body = b""
        if scope["method"] == "POST":
            body = await _read_body(receive)
            if body is None:
                return await _send_error(send, Decision(413, f"The request body is larger than "
                                                             f"{MAX_BODY // 2**20} MiB."))
        data = _json_object(body)
        model = data.get("model") if data is not None else None
        model = model if isinstance(model, str) else None
        served_as, content = self.policy.base, "base"
        if model and model != self.policy.base:
            decision = self.policy.authorize(tenant, model)
            if decision.ok:
                decision = self.policy.adapter(model, sticky=_end_user(data, scope),
                                               content=False)
            if decision.ok:
                decision = await self._content_checked(decision)
            if not decision.ok:
                return await _send_error(send, decision)
            if LOADED_HASHES.get(decision.label) != decision.content_hash:
                # a first use (or new content): the engine core reads these files next
                read_ahead(decision.path / name for name in decision.files)
            await self._unload_if_replaced(scope, decision.label, decision.content_hash)
            served_as, content = decision.label, decision.content_hash
        replay = receive
        if scope["method"] != "POST":
            return await self.app(scope, replay, send)
        name = tenant.name if tenant else ANONYMOUS
        request_id = uuid.uuid4().hex
        admission = await self.usage.call("admit", request_id, name,
                                          tenant.limits if tenant else {}, _reserve(data, body))
        if not admission.ok:
            return await _send_error(send, Decision(429, f"Rate limit reached for tenant "
                                                         f"`{name}`: {admission.reason}."),
                                     {**admission.headers,
                                      "retry-after": str(int(admission.retry_after))})
        if data is not None:
            # the version that answers is named to vLLM (its own LoRA and cache keys),
            # and the prefix cache is salted per tenant and content: cached prompts never
            # cross tenants or weights, whatever salt the client sent (the salt also tells
            # the engine's fair scheduler whose request it is)
            if model:
                data["model"] = served_as
            if path not in ("/tokenize", "/detokenize"):
                data["cache_salt"] = self._salt(tenant, served_as, content)
            body = json.dumps(data).encode()
            scope = _with_length(scope, len(body))
        replay = _replayer(body, receive)
        counted = self._counting(send, served_as if model else self.policy.base, name,
                                 request_id, admission.headers)
        try:
            return await self.app(scope, replay, counted)
        finally:
            if not counted.recorded:  # never answered (the client went away, an error)
                await self.usage.call("release", request_id)

    def _salt(self, tenant: Tenant | None, model: str, content: str | None) -> str:
        """The prefix-cache salt of one tenant on one set of weights (the base, or an adapter
        version's content): unguessable, since it is keyed with this server's secret."""
        name = tenant.name if tenant else ANONYMOUS
        key = f"{name}\0{model}\0{content}".encode()
        return salt_for(name, hmac.new(self._secret, key, hashlib.sha256).hexdigest()[:32])

    async def _content_checked(self, decision: Decision) -> Decision:
        """The adapter's files checked against their registered hashes: here where a cache
        knows every file's hash (a stat each), else in a thread: hashing a newly added
        adapter (2.4 ms for a rank-8 q/v adapter of SmolLM2, seconds for a large one)
        would hold up every other request on the event loop."""
        if all(cached_hash(decision.path / name) for name in decision.files):
            return self.policy.content_checked(decision)
        return await asyncio.to_thread(self.policy.content_checked, decision)

    async def _unload_if_replaced(self, scope, name: str, content_hash: str | None) -> None:
        """A name re-registered with other content: drop the engine's copy, so vLLM asks the
        resolver again and loads the new files (under a new LoRA id)."""
        loaded = LOADED_HASHES.get(name)
        if loaded is None or loaded == content_hash:
            return
        models = _serving_models(scope)
        if models is not None and name in models.lora_requests:
            from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

            await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
            logger.info("zoo: reloading %s (re-registered with other content)", name)
        LOADED_HASHES.pop(name, None)
        LOAD_FAILURES.pop(name, None)

    def _engine_report(self, tenant: Tenant | None) -> dict:
        """What the served weights cost, as the worker measured them (see plugin.py)."""
        from zoo.serve.plugin import STATE_VARIABLE, WEIGHTS_REPORT

        state = os.environ.get(STATE_VARIABLE)
        report = Path(state) / WEIGHTS_REPORT if state else None
        weights = json.loads(report.read_text()) if report and report.exists() else None
        return {"base": self.policy.base, "weights": weights,
                "adapter_file_bytes": {
                    a.name: sum(f["size"] for f in a.files.values())
                    for a in self.policy.served_adapters()
                    if tenant is None or tenant.may_use(a.name)}}

    async def _follow_registry(self, scope) -> None:
        """After a change to the registry, read it again in a thread (10,000 adapters: about
        0.5 s in which no stream would advance); requests arriving meanwhile wait for that
        same read. Then drop from the engine the adapters that left it (or stopped being
        servable)."""
        if self.policy.registry_changed():
            if self._reading is None:
                self._reading = asyncio.create_task(
                    asyncio.to_thread(self.policy.reread, versions=True))
                self._reading.add_done_callback(self._read_done)
            await asyncio.shield(self._reading)
        catalog = self.policy.catalog()  # the read just made, unless it changed again since
        if self._followed is catalog:
            return
        self._followed = catalog
        models = _serving_models(scope)
        if models is None:
            return
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        servable = self.policy.served_versions()
        gone = [name for name in list(models.lora_requests) if name not in servable]
        for name in gone:
            await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
            LOADED_HASHES.pop(name, None)
            LOAD_FAILURES.pop(name, None)
            logger.info("zoo: unloaded %s (no longer in the registry)", name)
        if gone:
            record_in_use(self.policy.registry.home, set(LOADED_HASHES))

    def _read_done(self, task: asyncio.Task) -> None:
        self._reading = None  # the next request after another change starts the next read
        if not task.cancelled():
            task.exception()  # its waiters got it; marked seen for asyncio

    async def _list_models(self, scope, receive, send, tenant: Tenant | None):
        status, headers, body = await _capture(self.app, scope, receive)
        if status != 200:
            return await _send_raw(send, status, headers, body)
        listing = json.loads(body)
        created = listing["data"][0].get("created") if listing["data"] else None
        with_versions = b"versions=true" in scope.get("query_string", b"")
        cards = [card for card in listing["data"] if card["id"] == self.policy.base]
        # each adapter's files checked (a stat each): 10,000 adapters, 0.2 s off the loop
        for adapter in await asyncio.to_thread(self.policy.served_adapters):
            if tenant is not None and not tenant.may_use(adapter.name):
                continue
            cards.append({"id": adapter.name, "object": "model", "owned_by": "zoo",
                          "parent": self.policy.base, "created": created,
                          "version": label(adapter.name, adapter.version)})
            if with_versions:
                cards += [{"id": label(adapter.name, n), "object": "model", "owned_by": "zoo",
                           "parent": adapter.name, "created": created}
                          for n, record in sorted(adapter.all_versions().items())
                          if record.servable]
        for card in cards:  # vLLM puts the server's own paths here
            card["root"] = card["id"]
        listing["data"] = cards
        return await _send_json(send, 200, listing)

    def _counting(self, send, model: str, tenant: str, request_id: str,
                  headers: dict[str, str]):
        """Wrap ``send`` to read token usage from the response (JSON or SSE stream) and make
        it durable before the response's last message (a stream's ``[DONE]``) goes out, and
        to say in headers which model (which version of an adapter) answered and where the
        tenant's limits stand."""
        state = {"status": 200, "buffer": b""}
        extra = [(VERSION_HEADER, model.encode()),
                 *((k.encode(), v.encode()) for k, v in headers.items())]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                state["buffer"] += body
                # a stream's client stops reading at its end marker, before the empty last
                # message: the usage must be durable before the marker goes out
                last = not message.get("more_body", False) or \
                    body.rstrip().endswith(b"data: [DONE]")
                if last and not counting_send.recorded:
                    prompt = completion = 0
                    if state["status"] == 200:
                        LOAD_FAILURES.pop(model, None)  # answered: the engine has it now
                        try:
                            prompt, completion = _tokens_of(state["buffer"])
                        except (ValueError, TypeError, AttributeError):
                            logger.warning("zoo: could not read token usage of a response")
                    await self.usage.record(request_id, model, tenant, prompt, completion,
                                            state["status"])
                    counting_send.recorded = True
                    state["buffer"] = b""
            await send(message)

        counting_send.recorded = False
        return counting_send


def _tokens_of(body: bytes) -> tuple[int, int]:
    """Prompt and completion tokens from a JSON response or an SSE stream.

    A stream carries ``usage`` only when the client asked for it; otherwise
    each content chunk is one token, which is how vLLM streams.
    """
    text = body.decode("utf-8", "replace")
    if not text.lstrip().startswith("data:"):
        usage = json.loads(text).get("usage") or {}
        return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    prompt = completion = chunks = 0
    for line in text.splitlines():
        if not line.startswith("data:") or line.strip() == "data: [DONE]":
            continue
        event = json.loads(line[5:])
        if event.get("usage"):
            prompt = event["usage"].get("prompt_tokens", prompt)
            completion = event["usage"].get("completion_tokens", completion)
        elif event.get("choices"):
            chunks += 1
    return prompt, completion or chunks


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _json_object(body: bytes) -> dict | None:
    """The request body when it is a JSON object (vLLM answers anything else itself)."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):  # ValueError: undecodable, or a number of 4,300 digits
        return None
    return data if isinstance(data, dict) else None


def _end_user(data: dict | None, scope) -> str | None:
    """Who a request is for, to keep one person on one version of an adapter: the OpenAI
    ``user`` field, else a session or user header; None when nothing says."""
    user = data.get("user") if data else None
    if isinstance(user, str) and user:
        return f"user:{user}"
    for name, value in scope.get("headers", []):
        if name in (b"x-session-id", b"x-user-id") and value:
            return f"{name.decode()}:{value.decode('latin-1')}"
    return None


def _with_length(scope, length: int):
    """The scope with its content-length header made to match a rewritten body."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


def _serving_models(scope):
    return getattr(getattr(scope.get("app"), "state", None), "openai_serving_models", None)


async def _read_body(receive) -> bytes | None:
    """The whole request body, or None when it is larger than MAX_BODY."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY:
            return None
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replayer(body: bytes, receive):
    """Hand the already-read body to the app, then the real channel: vLLM listens
    on it for the client's disconnect to cancel the request."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _capture(app, scope, receive):
    status, headers, chunks = 500, [], []

    async def capture_send(message):
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], message.get("headers", [])
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, capture_send)
    return status, headers, b"".join(chunks)


async def _send_raw(send, status: int, headers, body: bytes):
    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, data) -> None:
    await _send_raw(send, status, [(b"content-type", b"application/json")],
                    json.dumps(data).encode())


ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 413: "RequestTooLargeError", 422: "UnprocessableEntityError",
               429: "RateLimitError"}
DEFAULT_RESERVE = 256  # tokens a request without max_tokens is assumed to generate
MOST_RESERVED = 2**31  # a larger max_tokens counts as this: vLLM generates no more than
# the model's context anyway, and the meter's SQLite holds 64-bit integers


def _reserve(data: dict | None, body: bytes) -> int:
    """The tokens a request may use, for the per-minute and per-month limits before it
    runs: its prompt (about 4 bytes a token) and what it may generate."""
    limit = None
    if data is not None:
        limit = data.get("max_completion_tokens") or data.get("max_tokens")
    limit = limit if is_count(limit) else DEFAULT_RESERVE
    return len(body) // 4 + min(limit, MOST_RESERVED)


async def _send_error(send, decision: Decision, headers: dict[str, str] | None = None) -> None:
    """An error in the OpenAI format, so the openai client raises the matching exception."""
    body = json.dumps({"error": {
        "message": decision.message, "type": ERROR_TYPES.get(decision.status, "Error"),
        "param": "model", "code": decision.status}}).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await _send_raw(send, decision.status, [(b"content-type", b"application/json"), *extra],
                    body)
