"""How the catalog page holds up with a thousand adapters, against ten, in one run.

Run: .venv/bin/python bench/ui.py [--adapters 1000]

A scratch home with a tiny base and N small LoRAs registered by `zoo add`'s own code, the
pages served alone (`zoo ui`), the system's Chromium (Playwright) reading them:

* server: the catalog page's HTML (median of 7 requests) and its size;
* browser: load to a painted table (`load` event), typing a filter (rows re-counted),
  and sorting the table by size (one click), each the median of 5.

The ratio column is the thousand-adapter home over the ten-adapter one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import save, table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]


def make_home(root: Path, adapters: int) -> Path:
    from tests.factory import save_llama, write_random_lora
    from zoo.catalog.registry import Registry
    from zoo.catalog.store import add

    home = root / "home"
    registry = Registry(home)
    base = save_llama(root / "tiny-base")
    add(base, "tiny-base", registry=registry)
    lora = write_random_lora(root / "lora", home / "bases" / "tiny-base", rank=4,
                             targets=("q_proj", "v_proj"))
    for i in range(adapters):
        add(lora, f"tenant-{i % 50}/adapter-{i}", "tiny-base", registry=registry)
    return home


def served(home: Path):
    from zoo.serve.launch import free_port

    port = free_port()
    process = subprocess.Popen([str(Path(sys.executable).with_name("zoo")), "ui", "--port",
                                str(port)], env={**os.environ, "ZOO_HOME": str(home)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=5)
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("zoo ui did not start")


def measure(browser, url: str) -> dict:
    fetches, size = [], 0
    for _ in range(7):
        start = time.perf_counter()
        size = len(urllib.request.urlopen(url, timeout=60).read())
        fetches.append(time.perf_counter() - start)
    loads, filters, sorts = [], [], []
    for _ in range(5):
        page = browser.new_page()
        start = time.perf_counter()
        page.goto(url, wait_until="load")
        loads.append(time.perf_counter() - start)
        total = page.inner_text("#adapters-count")
        start = time.perf_counter()
        page.fill("input[data-table=adapters]", "adapter-7")
        page.locator("#adapters-count").filter(has_not_text=total).wait_for()
        filters.append(time.perf_counter() - start)
        start = time.perf_counter()
        page.click("#adapters th:has-text('size')")
        page.locator("#adapters th.sorted-asc").wait_for()
        sorts.append(time.perf_counter() - start)
        page.close()
    return {"html_s": statistics.median(fetches), "html_kb": size / 1024,
            "load_s": statistics.median(loads), "filter_s": statistics.median(filters),
            "sort_s": statistics.median(sorts)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=1000)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    results = {}
    with tempfile.TemporaryDirectory() as scratch, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
        for count in (10, args.adapters):
            start = time.perf_counter()
            home = make_home(Path(scratch) / str(count), count)
            print(f"{count} adapters registered in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
            process, url = served(home)
            try:
                results[count] = measure(browser, url)
            finally:
                process.terminate()
                process.wait()
        browser.close()
    small, large = results[10], results[args.adapters]
    rows = [{"measure": key, "10 adapters": small[key], f"{args.adapters} adapters": large[key],
             "ratio": large[key] / small[key]} for key in small]
    print(table(rows, ["measure", "10 adapters", f"{args.adapters} adapters", "ratio"]))
    save("ui", {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
