"""zoo's pages in a real browser (the system's Chromium, driven by Playwright) against a real
engine and home: every page renders with real data, filtering works, a tenant never sees
another tenant's adapters or usage (checked on the raw responses too), the playground
streams two answers side by side, and nothing is fetched from anywhere but the server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import TENANT_KEYS as KEYS

pytestmark = pytest.mark.vllm
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page_for(browser, tenant_engine):
    """A fresh browser context signed in as a tenant; every request it makes to another
    host than the server is refused and recorded (the pages need no network)."""
    contexts = []

    def make(tenant: str | None):
        context = browser.new_context(viewport={"width": 1300, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.elsewhere = []
        server = urllib.parse.urlsplit(tenant_engine.root).netloc

        def only_the_server(route):
            if urllib.parse.urlsplit(route.request.url).netloc == server:
                return route.continue_()
            page.elsewhere.append(route.request.url)
            return route.abort()

        page.route("**/*", only_the_server)
        if tenant is not None:
            page.goto(tenant_engine.root + "/zoo/ui/")
            assert "/zoo/ui/login" in page.url  # signed out: sent to sign in
            page.fill("input[name=key]", KEYS[tenant])
            page.click("button")
            page.wait_for_url("**/zoo/ui/")
        return page

    yield make
    for context in contexts:
        context.close()


def raw(engine, path: str, cookie: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(engine.root + path)
    if cookie:
        request.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def session_cookie(page) -> str:
    cookies = page.context.cookies()
    return "; ".join(f"{c['name']}={c['value']}" for c in cookies)


def ask(engine, model: str, tenant: str) -> None:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 3}).encode()
    request = urllib.request.Request(engine.url + "/completions", data=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {KEYS[tenant]}"})
    urllib.request.urlopen(request, timeout=300).read()


def visible_rows(page, table: str) -> list[str]:
    return [r.inner_text().split("\t")[0].strip()
            for r in page.locator(f"#{table} tbody tr").all() if r.is_visible()]


def test_a_tenant_sees_its_own_adapters_and_usage_only(page_for, tenant_engine):
    ask(tenant_engine, "acme/x", "acme")
    ask(tenant_engine, "globex/g", "globex")
    page = page_for("acme")
    assert set(visible_rows(page, "adapters")) == {"acme/x"}
    assert "smollm2-135m-instruct" in page.inner_text("#bases")
    page.goto(tenant_engine.root + "/zoo/ui/usage")
    text = page.inner_text("main")
    assert "acme/x:v1" in text and "globex" not in text
    assert page.locator("svg").count() >= 2  # the plots
    cookie = session_cookie(page)
    for path in ("/zoo/ui/", "/zoo/ui/usage", "/zoo/ui/playground"):  # the raw HTML too
        status, html = raw(tenant_engine, path, cookie)
        assert status == 200 and "globex" not in html, path
        # nothing inline for the CSP to allow: scripts come from the server's one file
        assert not re.search(r"<script(?![^>]*\bsrc=)|\son[a-z]+=", html), path
    assert raw(tenant_engine, "/zoo/ui/entry/globex/g", cookie)[0] == 404
    assert raw(tenant_engine, "/zoo/ui/", None)[0] in (303, 200)  # urllib follows to sign in
    assert "Sign in" in raw(tenant_engine, "/zoo/ui/", None)[1]
    assert raw(tenant_engine, "/zoo/ui/", "zoo_session=acme|forged|9999999999|00")[1].count(
        "Sign in") >= 1
    with urllib.request.urlopen(tenant_engine.root + "/zoo/ui/login", timeout=60) as response:
        policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "unsafe" not in policy
    assert page.elsewhere == []


def test_an_operator_sees_everything_and_the_engine(page_for, tenant_engine):
    page = page_for("ops")
    assert {"acme/x", "globex/g"} <= set(visible_rows(page, "adapters"))
    page.goto(tenant_engine.root + "/zoo/ui/usage")
    assert "The engine" in page.inner_text("main") and "adapter loads" in page.inner_text("main")
    assert page.elsewhere == []


def test_filtering_and_sorting_in_the_page(page_for):
    page = page_for("ops")
    box = page.locator("input[data-table=adapters]")
    box.fill("globex")
    assert visible_rows(page, "adapters") == ["globex/g"]
    box.fill("no-such-adapter")
    assert visible_rows(page, "adapters") == []
    assert page.inner_text("#adapters-count") == "0"
    box.fill("")
    page.click("#adapters th:has-text('name')")
    page.click("#adapters th:has-text('name')")  # descending
    assert visible_rows(page, "adapters") == sorted(visible_rows(page, "adapters"), reverse=True)


def test_an_entry_page_shows_card_files_lineage_versions_and_similarity(page_for,
                                                                         tenant_engine):
    page = page_for("ops")
    page.click("a:has-text('acme/x')")
    text = page.inner_text("main")
    assert "intact" in text and "adapter_model.safetensors" in text and "sha256:" in text
    assert page.locator("svg.lineage").count() == 1
    assert "base smollm2-135m-instruct" in page.locator("svg.lineage").text_content()
    assert "v1" in text and "v2" in text  # its versions
    page.check("input[name=compare][value='globex/g']")
    page.click("button:has-text('compare')")
    page.wait_for_selector("svg[aria-label='acme/x vs globex/g']")
    assert page.locator("svg[aria-label='acme/x vs globex/g'] rect").count() >= 1
    page.goto(tenant_engine.root + "/zoo/ui/entry/smollm2-135m-instruct")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in page.inner_text("main")
    assert page.elsewhere == []


def streamed_text(body: str) -> str:
    """The answer an OpenAI event stream carries: its deltas' content, in order."""
    text = ""
    for line in body.splitlines():
        if line.startswith("data: ") and line.strip() != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices") or []:
                text += (choice.get("delta") or {}).get("content") or ""
    return text


def test_the_playground_streams_two_answers_side_by_side(page_for):
    prompt = "Name three things a lighthouse keeper does."
    page = page_for("acme")
    page.click("a:has-text('Playground')")
    page.fill("textarea[name=prompt]", prompt)
    streams = []  # what the server sent the page, read off the wire
    page.on("response", lambda r: streams.append(r) if r.url.endswith("/chat/completions") else 0)
    for box in page.locator("input[name=model]").all():
        box.uncheck()
    page.check("input[name=model][value='smollm2-135m-instruct']")
    page.check("input[name=model][value='acme/x']")
    page.fill("input[name=max_tokens]", "24")
    page.click("#run")
    # a selector, not a JS predicate: the page's Content-Security-Policy forbids eval
    page.locator("pre.answer[data-state=done]").nth(1).wait_for(timeout=120_000)
    answers = {b.get_attribute("data-model"): b for b in page.locator("pre.answer").all()}
    assert set(answers) == {"smollm2-135m-instruct", "acme/x"}
    for box in answers.values():
        assert box.inner_text().strip() and int(box.get_attribute("data-chunks")) > 1  # streamed
    assert answers["acme/x"].get_attribute("data-answered-by") == "acme/x:v1"
    sent = {json.loads(r.request.post_data)["model"]: streamed_text(r.text()) for r in streams}
    assert set(sent) == set(answers)
    for model, box in answers.items():  # the page shows exactly what was streamed to it
        assert box.inner_text() == sent[model] and sent[model].strip()
    assert page.elsewhere == []


def test_zoo_ui_serves_the_catalog_alone(browser, tenant_engine, tmp_path):
    from tests.helpers import wait_until
    from zoo.serve.launch import free_port

    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        ui = subprocess.Popen([str(Path(sys.executable).with_name("zoo")), "ui", "--port",
                               str(port)], env={**os.environ, "ZOO_HOME": str(tenant_engine.home)},
                              stdout=out, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status == 200
            except OSError:
                return False

        assert wait_until(up, 60), log.read_text()[-2000:]
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        assert {"acme/x", "globex/g"} <= set(visible_rows(page, "adapters"))
        assert "Playground" not in page.inner_text("header")  # no engine behind it
        page.click("a:has-text('globex/g')")
        assert "globex/g" in page.inner_text("h1")
        before = (tenant_engine.home / "registry.json").read_bytes()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/zoo/ui/", data=b"x=1")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 405  # read-only
        assert (tenant_engine.home / "registry.json").read_bytes() == before
        context.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)
