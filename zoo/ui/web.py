"""zoo's web pages as ASGI: under ``/zoo/ui/`` of a running ``zoo serve`` (an outer
middleware in front of zoo's API middleware, same port, same keys), or alone with
``zoo ui`` (the catalog at ``/``, bound to localhost).

With an API keys file, a visitor signs in with its key: the session is a signed cookie
(the tenant, the hash of the key, an expiry and an HMAC with a secret kept in the home,
so replicas of one home accept each other's sessions, and a revoked key ends its
sessions). A tenant sees the bases and its own adapters and usage; an operator (adapters
``*``) sees everything; a server without keys shows everything, as its API does. Every
page is read-only, and is rendered in a thread of its own so the engine's event loop
keeps streaming tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from zoo.serve.policy import LOADED_HASHES, ServePolicy, Tenant, hash_key, shared_policy
from zoo.ui import pages

COOKIE = "zoo_session"
SESSION_S = 8 * 3600
STATIC = {"zoo.css": "text/css", "zoo.js": "text/javascript"}
SECRET_FILE = "ui-secret"


class Pages:
    """ASGI middleware answering ``/zoo/ui/...``; anything else goes to ``app`` (or is a
    404 when there is none: ``zoo ui`` alone)."""

    def __init__(self, app=None, policy: ServePolicy | None = None, served: bool = True,
                 root_is_catalog: bool = False):
        self.app = app
        self.policy = policy or shared_policy()
        self.served = served
        self.root_is_catalog = root_is_catalog
        self._thread = ThreadPoolExecutor(2, thread_name_prefix="zoo-pages")
        self._local = threading.local()
        self._secret = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.root_is_catalog and path == "/":
            path = pages.ROOT + "/"
        if not (path == pages.ROOT or path.startswith(pages.ROOT + "/")):
            if self.app is None:
                return await _respond(send, 404, b"not found", "text/plain")
            return await self.app(scope, receive, send)
        rest = path[len(pages.ROOT):].strip("/")
        if rest.startswith("static/"):
            return await self._static(send, rest.removeprefix("static/"))
        if rest == "login":
            return await self._login(scope, receive, send)
        if rest == "logout":
            return await _redirect(send, pages.href("login"), cookie=f"{COOKIE}=; Path=/; Max-Age=0")
        if scope["method"] not in ("GET", "HEAD"):
            return await _respond(send, 405, b"the pages are read-only", "text/plain")
        viewer = self._viewer(scope)
        if viewer is None:
            return await _redirect(send, pages.href("login"))
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode())
        html = await self._render(rest, viewer, query)
        if html is None:
            return await _respond(send, 404, b"no such page, or not yours to see", "text/plain")
        return await _respond(send, 200, html.encode(), "text/html; charset=utf-8")

    # -- who is looking ------------------------------------------------------------------
    def _viewer(self, scope) -> pages.Viewer | None:
        tenants = self.policy.current_tenants()
        if tenants is None:
            return pages.Viewer(None, None)
        tenant = self._session(_cookie(scope, COOKIE), tenants)
        if tenant is None:
            return None
        return pages.Viewer(tenant.name, None if tenant.operator else tenant.adapters)

    def _secret_key(self) -> bytes:
        """Kept in the home so that every replica of it signs and checks alike."""
        if self._secret is None:
            path = self.policy.registry.home / "run" / SECRET_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(32))
            except FileExistsError:
                pass
            self._secret = path.read_bytes()
        return self._secret

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret_key(), text.encode(), hashlib.sha256).hexdigest()

    def _cookie_for(self, tenant: str, key: str) -> str:
        body = f"{tenant}|{hash_key(key)}|{int(time.time()) + SESSION_S}"
        return f"{body}|{self._sign(body)}"

    def _session(self, cookie: str | None, tenants: list[Tenant]) -> Tenant | None:
        if not cookie or cookie.count("|") != 3:
            return None
        body, _, signature = cookie.rpartition("|")
        name, key_hash, expiry = body.split("|")
        # bytes: compare_digest refuses str with other than ASCII (a cookie can hold any)
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()) or \
                int(expiry) < time.time():
            return None
        for tenant in tenants:  # the key must still be one of the tenant's
            if tenant.name == name and any(
                    hmac.compare_digest(k if k.startswith("sha256:") else hash_key(k), key_hash)
                    for k in tenant.keys):
                return tenant
        return None

    async def _login(self, scope, receive, send):
        if self.policy.current_tenants() is None:
            return await _redirect(send, pages.href())
        if scope["method"] != "POST":
            return await _respond(send, 200, pages.login_page().encode(), "text/html; charset=utf-8")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > 8192 or not message.get("more_body"):
                break
        key = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("key", [""])[0]
        tenant = self.policy.tenant_for(key.strip())
        if tenant is None:
            return await _respond(send, 401, pages.login_page("Unknown API key.").encode(),
                                  "text/html; charset=utf-8")
        cookie = (f"{COOKIE}={self._cookie_for(tenant.name, key.strip())}; Path=/; HttpOnly; "
                  f"SameSite=Strict; Max-Age={SESSION_S}")
        return await _redirect(send, pages.href(), cookie=cookie)

    # -- the pages -----------------------------------------------------------------------
    async def _render(self, rest: str, viewer: pages.Viewer, query: dict) -> str | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._page, rest, viewer, query)

    def _meter(self):
        from zoo.serve.meter import Meter

        meter = getattr(self._local, "meter", None)
        if meter is None:
            meter = self._local.meter = Meter(self.policy.registry.home, server=0)
        return meter

    def _page(self, rest: str, viewer: pages.Viewer, query: dict) -> str | None:
        registry = self.policy.registry
        mine = None if viewer.operator else viewer.tenant
        if rest in ("", "catalog"):
            usage = self._meter().report(tenant=mine, by="adapter") if (
                self._meter().path.exists()) else []
            return pages.catalog_page(registry, viewer, usage, self.served)
        if rest.startswith("entry/"):
            name = urllib.parse.unquote(rest.removeprefix("entry/"))
            return pages.entry_page(registry, name, viewer, query.get("compare", []),
                                    self.served)
        if rest == "usage":
            meter = self._meter()
            by_adapter = [r for r in meter.report(tenant=mine, by="adapter")
                          if viewer.sees(r["model"]) or r["model"] == self.policy.base]
            return pages.usage_page(viewer, meter.report(tenant=mine, by="day"), by_adapter,
                                    self._engine(meter) if self.served else None, self.served)
        if rest == "playground" and self.served:
            adapters = [a.name for a in self.policy.served_adapters() if viewer.sees(a.name)]
            return pages.playground_page(viewer, self.policy.base, adapters)
        return None

    def _engine(self, meter) -> dict:
        from zoo.serve.policy import LOAD_COUNT, LOAD_FAILURES

        since = time.time() - 60
        recent = meter.db.execute("SELECT COALESCE(SUM(completion_tokens), 0) FROM usage "
                                  "WHERE at > ?", (since,)).fetchone()[0]
        failed = dict(LOAD_FAILURES)
        return {"base": self.policy.base, "loads": LOAD_COUNT[0],
                "loaded": sorted(name for name in LOADED_HASHES if name not in failed),
                "failed": dict(sorted(failed.items())), "tokens_per_second": recent / 60}

    async def _static(self, send, name: str):
        if name not in STATIC:
            return await _respond(send, 404, b"not found", "text/plain")
        data = resources.files("zoo.ui").joinpath(f"static/{name}").read_bytes()
        return await _respond(send, 200, data, STATIC[name], cache=True)


def _cookie(scope, name: str) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k == name:
                    return v
    return None


async def _respond(send, status: int, body: bytes, content_type: str, cache: bool = False,
                   headers: list | None = None) -> None:
    extra = [(b"cache-control", b"max-age=300" if cache else b"no-store"),
             (b"x-content-type-options", b"nosniff"),
             (b"content-security-policy",
              b"default-src 'self'; script-src 'self'; style-src 'self'; "
              b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'")]
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
        *extra, *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _redirect(send, location: str, cookie: str | None = None) -> None:
    headers = [(b"location", location.encode())]
    if cookie:
        headers.append((b"set-cookie", cookie.encode()))
    await _respond(send, 303, b"", "text/plain", headers=headers)


def serve_pages(home: Path, host: str = "127.0.0.1", port: int = 8080,
                api_keys: Path | None = None) -> None:
    """``zoo ui``: the catalog pages alone (no engine), on localhost by default."""
    import uvicorn

    from zoo.catalog.registry import Registry
    from zoo.serve.meter import check_meter
    from zoo.serve.policy import load_tenants

    base = ""
    check_meter(home)  # the usage pages read it: a damaged one is said at start
    catalog = Registry(home).load()
    bases = catalog.bases()
    if bases:
        base = bases[0].name
    policy = ServePolicy(Registry(home), base, 512,
                         load_tenants(api_keys) if api_keys else None, api_keys)
    app = Pages(None, policy, served=False, root_is_catalog=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
