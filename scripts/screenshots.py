"""Screenshots of zoo's pages for the README, from a real engine with some traffic.

    .venv/bin/python scripts/screenshots.py [--out docs]

A scratch home with the embedded base (the benchmarks' cached home supplies it), a few
adapters of two tenants (one with two versions, one combined from two others), requests
from both tenants, then the system's Chromium (Playwright) signed in as the operator.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BASE = "smollm2-135m-instruct"
KEYS = {"acme": "sk-acme-screens-01", "globex": "sk-globex-screens-01",
        "ops": "sk-ops-screens-0001"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    from common import scratch_home
    from playwright.sync_api import sync_playwright

    from tests.factory import write_random_lora
    from zoo.catalog.registry import Registry
    from zoo.catalog.store import add
    from zoo.merge.algebra import CombineOptions, combine
    from zoo.serve.launch import ServeOptions, free_port, running_server

    home = scratch_home(Path(tempfile.mkdtemp(prefix="zoo-screens.")) / "home")
    registry = Registry(home)
    base_dir = home / "bases" / BASE
    for i, (name, targets) in enumerate((("acme/support", ("q_proj", "v_proj")),
                                         ("acme/legal", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                         ("globex/pirate", ("q_proj", "v_proj")))):
        add(write_random_lora(home.parent / name, base_dir, seed=i, scale=0.05, targets=targets),
            name, BASE, registry=registry)
    add(write_random_lora(home.parent / "support-v2", base_dir, seed=9, scale=0.05,
                          targets=("q_proj", "v_proj")), "acme/support", registry=registry,
        new_version=True)
    combine(CombineOptions(adapters=("acme/support", "acme/legal"), name="acme/both",
                           logits=False), registry)
    keys = home.parent / "keys.json"
    keys.write_text(json.dumps({"tenants": {
        "acme": {"keys": [KEYS["acme"]]}, "globex": {"keys": [KEYS["globex"]], "weight": 2},
        "ops": {"keys": [KEYS["ops"]], "adapters": ["*"]}}}))
    options = ServeOptions(base=BASE, quantization="none", port=free_port(), api_keys=keys)
    with running_server(options, registry, log=print) as server:
        for tenant, model in (("acme", "acme/support"), ("acme", "acme/legal"),
                              ("globex", "globex/pirate"), ("acme", BASE), ("globex", BASE)):
            for _ in range(3):
                body = json.dumps({"model": model, "prompt": "Hello there", "max_tokens": 8})
                request = urllib.request.Request(
                    server.url + "/completions", data=body.encode(),
                    headers={"Content-Type": "application/json",
                             "Authorization": f"Bearer {KEYS[tenant]}"})
                urllib.request.urlopen(request, timeout=300).read()
        root = server.url.removesuffix("/v1")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(root + "/zoo/ui/")
            page.fill("input[name=key]", KEYS["ops"])
            page.click("button")
            page.wait_for_url("**/zoo/ui/")
            page.screenshot(path=args.out / "ui-catalog.png")
            page.goto(root + "/zoo/ui/entry/acme/both?compare=acme/support&compare=acme/legal")
            page.screenshot(path=args.out / "ui-entry.png", full_page=False)
            page.goto(root + "/zoo/ui/usage")
            page.screenshot(path=args.out / "ui-usage.png")
            page.goto(root + "/zoo/ui/playground")
            for box in page.locator("input[name=model]").all():
                box.uncheck()
            for model in (BASE, "acme/support", "globex/pirate"):
                page.check(f"input[name=model][value='{model}']")
            page.click("#run")
            page.locator("pre.answer[data-state=done]").nth(2).wait_for(timeout=120_000)
            page.screenshot(path=args.out / "ui-playground.png")
            browser.close()
    shutil.rmtree(home.parent, ignore_errors=True)
    print("screenshots in", args.out)


if __name__ == "__main__":
    main()
