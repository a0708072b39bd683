"""The pages, rendered on the server from the registry and the meter: plain HTML, escaped,
one stylesheet and one script shipped with zoo. Nothing here writes anything."""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path
from urllib.parse import quote

from zoo.catalog.integrity import changed_files
from zoo.catalog.registry import Registry, filter_entries
from zoo.core.records import AdapterEntry, BaseEntry
from zoo.ui.svg import bars, heatmap, lineage

ROOT = "/zoo/ui"
SECTIONS = (("catalog", "Catalog"), ("usage", "Usage"), ("playground", "Playground"))


@dataclass(frozen=True)
class Viewer:
    """Who is looking: a tenant (its own adapters and usage), an operator, or anyone on a
    server without keys (everything, as the API)."""

    tenant: str | None
    patterns: tuple[str, ...] | None  # None: sees every adapter
    signed_in: bool = True

    def sees(self, adapter: str) -> bool:
        import fnmatch

        name = adapter.partition(":")[0]
        return self.patterns is None or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    @property
    def operator(self) -> bool:
        return self.patterns is None


def href(*parts: str, **query) -> str:
    path = "/".join(quote(p, safe="/:@") for p in parts)
    url = f"{ROOT}/{path}" if path else f"{ROOT}/"
    if query:
        url += "?" + "&".join(f"{quote(k)}={quote(str(v))}" for k, values in query.items()
                              for v in (values if isinstance(values, list | tuple) else [values]))
    return url


def page(title: str, body: str, viewer: Viewer, here: str = "", served: bool = True) -> str:
    links = " ".join(
        f'<a href="{href(key)}" class="{"here" if key == here else ""}">{label}</a>'
        for key, label in SECTIONS if served or key != "playground")
    who = ("" if viewer.tenant is None else
           f'<span class="who">{escape(viewer.tenant)} · <a href="{href("logout")}">sign out'
           f'</a></span>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)} · zoo</title>"
            f'<link rel="stylesheet" href="{href("static", "zoo.css")}">'
            f'<script src="{href("static", "zoo.js")}" defer></script></head><body>'
            f'<header><strong>zoo</strong> {links}{who}</header><main>{body}</main></body></html>')


def _size(files: dict) -> int:
    return sum(int(f.get("size", 0)) for f in files.values())


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _variant(variant: str) -> str:
    return "" if variant == "original" else "@" + escape(variant)


def _losses(evaluations: dict) -> str:
    return ", ".join(f"{escape(v)} {e['loss']:.3f} (ppl {e['perplexity']:.1f})"
                     for v, e in sorted((evaluations or {}).items())) or "—"


def _usage_by_name(rows: list[dict]) -> dict[str, dict]:
    totals: dict[str, dict] = {}
    for row in rows:
        name = row["model"].partition(":")[0]
        t = totals.setdefault(name, {"requests": 0, "tokens": 0})
        t["requests"] += row["requests"]
        t["tokens"] += (row["prompt_tokens"] or 0) + (row["completion_tokens"] or 0)
    return totals


# -- the catalog -------------------------------------------------------------------------

# what the catalog's rows read of each stored entry, checked before it is shown
SHOWN_FIELDS = {
    "base": ("name", "kind", "parameters", "dtype", "files", "variants", "evaluations", "hub"),
    "adapter": ("name", "kind", "base", "base_variant", "rank", "target_modules", "files",
                "servable", "servable_reason", "evaluations", "version", "versions")}


LINEAGE_FIELDS = {"base": ("name", "kind", "source", "base"),
                  "adapter": ("name", "kind", "source", "base")}


def catalog_page(registry: Registry, viewer: Viewer, usage_rows: list[dict],
                 served: bool = True) -> str:
    catalog = registry.load()
    malformed: dict[str, str] = {}
    entries = filter_entries(catalog, fields=SHOWN_FIELDS, malformed=malformed)
    usage = _usage_by_name(usage_rows)
    bases = [e for e in entries if e["kind"] in ("base", "merged")]
    adapters = [e for e in entries if e["kind"] not in ("base", "merged") and viewer.sees(e["name"])]
    hidden = [f"{escape(name)} ({escape(why)})" for name, why in malformed.items()
              if viewer.sees(name)]
    base_rows = []
    for b in bases:
        variants = []
        for scheme, v in sorted(b.get("variants", {}).items()):
            ppl = (b.get("evaluations") or {}).get(scheme, {}).get("perplexity")
            variants.append(f'<span class="tag">{escape(scheme)}</span>{human(_size(v["files"]))}'
                            + (f", ppl {ppl:.1f}" if ppl else ""))
        original = (b.get("evaluations") or {}).get("original", {}).get("perplexity")
        hub = (b.get("hub") or {}).get("repo")
        base_rows.append(
            f'<tr><td><a href="{href("entry", b["name"])}">{escape(b["name"])}</a></td>'
            f'<td>{escape(b["kind"])}</td><td class="num" data-value="{b["parameters"]}">'
            f'{human(b["parameters"]).replace(" B", "").replace("B", "")} params</td>'
            f'<td>{escape(b["dtype"])}, {human(_size(b["files"]))}'
            f'{f", ppl {original:.1f}" if original else ""}</td>'
            f'<td>{" · ".join(variants) or "—"}</td><td>{escape(hub or "—")}</td></tr>')
    rows = []
    for a in adapters:
        use = usage.get(a["name"], {"requests": 0, "tokens": 0})
        servable = '<span class="ok">yes</span>' if a["servable"] else \
            f'<span class="warn">no</span>: {escape(a.get("servable_reason") or "")}'
        versions = 1 + len(a.get("versions") or {})
        search = " ".join([a["name"], a["kind"], a["base"], " ".join(a["target_modules"]),
                           "servable" if a["servable"] else "unservable"]).lower()
        rows.append(
            f'<tr data-search="{escape(search)}"><td><a href="{href("entry", a["name"])}">'
            f'{escape(a["name"])}</a></td><td>{escape(a["kind"])}</td>'
            f'<td>{escape(a["base"])}{_variant(a["base_variant"])}</td>'
            f'<td class="num">{a["rank"]}</td><td>{escape(", ".join(a["target_modules"]))}</td>'
            f'<td class="num" data-value="{_size(a["files"])}">{human(_size(a["files"]))}</td>'
            f'<td>{servable}</td><td>{_losses(a.get("evaluations"))}</td>'
            f'<td class="num" data-value="{a.get("version", 1)}">v{a.get("version", 1)}'
            f'{f" of {versions}" if versions > 1 else ""}</td>'
            f'<td class="num">{use["requests"]}</td><td class="num">{use["tokens"]}</td></tr>')
    warning = (f'<p class="warn">Malformed in registry.json, so not shown (mend them by hand): '
               f'{"; ".join(hidden)}</p>' if hidden else "")
    body = (f"<h1>Catalog</h1>{warning}<h2>Bases</h2><table id=\"bases\"><thead><tr>"
            f"<th data-sort>name</th><th data-sort>kind</th><th data-sort>size</th>"
            f"<th>weights</th><th>variants</th><th>Hub</th></tr></thead><tbody>"
            f"{''.join(base_rows)}</tbody></table>"
            f'<h2>Adapters (<span id="adapters-count">{len(rows)}</span>)</h2>'
            f'<div class="tools"><input type="search" placeholder="filter: name, kind, base, '
            f'module, servable" data-table="adapters" aria-label="filter adapters"></div>'
            f'<table id="adapters"><thead><tr><th data-sort>name</th><th data-sort>kind</th>'
            f"<th data-sort>base</th><th data-sort>rank</th><th>targets</th>"
            f"<th data-sort>size</th><th data-sort>servable</th><th>held-out loss</th>"
            f"<th data-sort>version</th><th data-sort>requests</th><th data-sort>tokens</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return page("Catalog", body, viewer, "catalog", served)


# -- one entry -----------------------------------------------------------------------------

def entry_page(registry: Registry, name: str, viewer: Viewer, compare: list[str],
               served: bool = True) -> str | None:
    """None when the entry does not exist or is not the viewer's to see."""
    from zoo.catalog import versions

    catalog = registry.load()
    try:
        entry = versions.resolve(catalog, name) if versions.SEPARATOR in name else \
            catalog.entries.get(name)
    except Exception:  # noqa: BLE001 - an unknown version is a 404 like an unknown name
        return None
    if entry is None or (isinstance(entry, AdapterEntry) and not viewer.sees(entry.name)):
        return None
    stored = registry.home / entry.path if entry.path else None
    changed = changed_files(stored, entry.files) if stored else []
    integrity = ('<span class="ok">intact: every file matches its recorded hash</span>'
                 if not changed else f'<span class="warn">changed: {escape(", ".join(changed))}'
                 "</span>")
    files = "".join(f"<tr><td>{escape(f)}</td><td class=\"num\">{v['size']}</td>"
                    f"<td><code>{escape(v['sha256'])}</code></td></tr>"
                    for f, v in sorted(entry.files.items()))
    card = ""
    if stored is not None and (stored / "README.md").is_file():
        text = (stored / "README.md").read_text(errors="replace")[:20000]
        card = (f'<h2>Card</h2><details class="card"{" open" if len(text) < 2000 else ""}>'
                f'<summary>README.md ({len(text)} characters)</summary><pre>{escape(text)}</pre>'
                f"</details>")
    facts = {k: v for k, v in entry.to_dict().items()
             if k not in ("files", "versions", "history", "evaluations", "path", "variants")}
    version = f" <span class=muted>v{entry.version}</span>" if isinstance(entry, AdapterEntry) \
        else ""
    body = [f"<h1>{escape(entry.name)}{version}</h1>",
            f'<div class="card"><strong>{escape(entry.kind)}</strong> · {integrity}</div>',
            "<h2>Lineage</h2>", lineage(*_lineage(catalog, entry, viewer), href=href),
            "<h2>Evaluations</h2>", _evaluations(entry)]
    if isinstance(entry, AdapterEntry):
        body.append(_versions(catalog.adapter(entry.name)))
        body.append(_similarity(registry, catalog, entry, viewer, compare))
    if isinstance(entry, BaseEntry) and entry.variants:
        body.append("<h2>Variants</h2><table><thead><tr><th>scheme</th><th>size</th>"
                    "<th>content hash</th><th>quantization</th></tr></thead><tbody>" + "".join(
                        f"<tr><td>{escape(s)}</td><td>{human(_size(v.files))}</td>"
                        f"<td><code>{escape(v.content_hash)}</code></td>"
                        f"<td><pre>{escape(json.dumps(v.quantization)[:400])}</pre></td></tr>"
                        for s, v in sorted(entry.variants.items())) + "</tbody></table>")
    body += [card, f"<h2>Files</h2><table><thead><tr><th>file</th><th>bytes</th><th>sha256</th>"
             f"</tr></thead><tbody>{files}</tbody></table>",
             f"<h2>Registry record</h2><pre>{escape(json.dumps(facts, indent=2)[:20000])}</pre>"]
    return page(entry.name, "".join(body), viewer, "catalog", served)


def _lineage(catalog, entry, viewer: Viewer) -> tuple[list[tuple[str, str | None]],
                                                     str, list[tuple[str, str | None]]]:
    """(what it came from, the entry, what was made from it): (label, entry name or None)."""
    inputs: list[tuple[str, str | None]] = []
    source = entry.source or {}
    if isinstance(entry, AdapterEntry):
        base = f"base {entry.base}" + ("" if entry.base_variant == "original"
                                       else f" (trained on @{entry.base_variant})")
        inputs.append((base, entry.base))
    elif entry.base:
        inputs.append((f"merged from base {entry.base}", entry.base))
    if source.get("type") == "train":
        inputs.append((f"data {source.get('data')} {str(source.get('data_sha256', ''))[7:19]}", None))
    if source.get("type") == "hub" or (entry.hub or {}).get("repo"):
        hub = entry.hub or source
        inputs.append((f"Hub {hub.get('repo')}@{str(hub.get('commit', ''))[:10]}", None))
    if source.get("type") == "gguf":
        inputs.append((f"GGUF {source.get('file')} ({source.get('package')})", None))
    for a in source.get("adapters") or []:
        if isinstance(a, dict) and viewer.sees(str(a.get("name", ""))):
            version = f":v{a['version']}" if a.get("version") else ""
            inputs.append((f"{source.get('type')} of {a.get('name')}{version} x{a.get('weight', 1)}",
                           a.get("name")))
    if source.get("type") == "compress" and viewer.sees(str(source.get("from", ""))):
        inputs.append((f"compressed from {source.get('from')}:v{source.get('from_version', 1)}",
                       source.get("from")))
    if source.get("type") == "extract":
        inputs.append((f"extracted from {Path(str(source.get('model'))).name}", None))
    made = []
    for other in filter_entries(catalog, fields=LINEAGE_FIELDS, malformed={}):
        s, name = other["source"], other["name"]
        inputs_of = s.get("adapters") if isinstance(s.get("adapters"), list) else []
        uses = [a.get("name") for a in inputs_of if isinstance(a, dict)]
        if entry.name in uses or s.get("from") == entry.name or (
                isinstance(entry, BaseEntry) and other.get("base") == entry.name):
            if other["kind"] in ("base", "merged") or viewer.sees(name):
                made.append((f"{other['kind']} {name}", name))
    return inputs, entry.name, made


def _evaluations(entry) -> str:
    if not entry.evaluations:
        return '<p class="muted">none yet: <code>zoo eval NAME</code></p>'
    return ("<table><thead><tr><th>variant</th><th>loss</th><th>perplexity</th><th>tokens</th>"
            "<th>data</th><th>engine</th><th>at</th></tr></thead><tbody>" + "".join(
                f"<tr><td>{escape(v)}</td><td class=num>{e['loss']:.4f}</td>"
                f"<td class=num>{e['perplexity']:.2f}</td><td class=num>{e['tokens']}</td>"
                f"<td>{escape(e['data'])}</td><td>{escape(e['engine'])}</td><td>{escape(e['at'])}</td></tr>"
                for v, e in sorted(entry.evaluations.items())) + "</tbody></table>")


def _versions(name_entry: AdapterEntry) -> str:
    from zoo.catalog.versions import describe

    view = describe(name_entry)
    rows = "".join(
        f'<tr><td><a href="{href("entry", v["label"])}">v{v["version"]}</a></td>'
        f'<td>{escape(", ".join(v["aliases"]) or "—")}</td>'
        f'<td><code>{escape(v["content_hash"][:23])}</code></td>'
        f'<td>{escape(v["created"])}</td><td>{escape(v["source"])}</td></tr>'
        for v in view["versions"])
    canary = ""
    if view["canary"]:
        canary = (f'<p>canary: v{view["canary"]["version"]} answers '
                  f'{view["canary"]["percent"]}% of end users</p>')
    return (f"<h2>Versions</h2>{canary}<table><thead><tr><th>version</th><th>aliases</th>"
            f"<th>content</th><th>created</th><th>source</th></tr></thead><tbody>{rows}"
            f"</tbody></table>")


def _similarity(registry, catalog, entry: AdapterEntry, viewer: Viewer,
                compare: list[str]) -> str:
    others = [a.name for a in catalog.adapters(base=entry.base)
              if a.name != entry.name and a.kind != "bottleneck" and viewer.sees(a.name)]
    if entry.kind == "bottleneck" or not others:
        return ""
    boxes = "".join(f'<label><input type="checkbox" name="compare" value="{escape(o)}"'
                    f'{" checked" if o in compare else ""}> {escape(o)}</label> '
                    for o in others[:200])
    result = ""
    picked = [c for c in compare if c in others][:6]
    if picked:
        from zoo.merge.algebra import similarity

        maps = []
        for other in picked:
            found = similarity(entry.name, other, registry=registry)
            matrix = sum(found.modules.values()) / len(found.modules)
            maps.append(heatmap(matrix.tolist(), f"{entry.name} vs {other}",
                                found.ranks))
        result = '<div class="grid">' + "".join(maps) + "</div>"
    return (f'<h2>Subspace similarity</h2><form method="get" class="card">{boxes}'
            f'<button>compare</button></form>{result}'
            f'<p class="muted">phi(i, j): how much of one adapter\'s top-i input directions '
            f"lie in the other's top-j (1: the same subspace), averaged over modules; "
            f"<code>zoo similarity</code> computes the same.</p>")


# -- usage and the engine ------------------------------------------------------------------

def usage_page(viewer: Viewer, by_day: list[dict], by_adapter: list[dict],
               engine: dict | None, served: bool = True) -> str:
    tenants = sorted({r["tenant"] for r in by_day})
    days = sorted({r["day"] for r in by_day})
    series = {t: [sum((r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)
                      for r in by_day if r["tenant"] == t and r["day"] == d) for d in days]
              for t in tenants}
    requests = {t: [sum(r["requests"] for r in by_day if r["tenant"] == t and r["day"] == d)
                    for d in days] for t in tenants}
    rows = "".join(
        f"<tr><td>{escape(r['model'])}</td><td>{escape(r['tenant'])}</td>"
        f"<td class=num>{r['requests']}</td><td class=num>{r['prompt_tokens']}</td>"
        f"<td class=num>{r['completion_tokens']}</td><td class=num>{r['ok']}</td></tr>"
        for r in by_adapter)
    body = ["<h1>Usage</h1>",
            '<p class="muted">From the home\'s durable meter: every server and replica, across '
            "restarts.</p>"]
    if days:
        body += ['<div class="grid">', bars(days, series, "tokens per day, by tenant"),
                 bars(days, requests, "requests per day, by tenant"), "</div>"]
    body.append(f'<h2>By adapter version and tenant</h2><div class="tools"><input type=search '
                f'data-table="usage" placeholder="filter"></div><table id="usage"><thead><tr>'
                f"<th data-sort>model</th><th data-sort>tenant</th><th data-sort>requests</th>"
                f"<th data-sort>prompt tokens</th><th data-sort>completion tokens</th>"
                f"<th data-sort>answered</th></tr></thead><tbody>{rows}</tbody></table>")
    if engine is not None and viewer.operator:
        loaded = "".join(f"<li>{escape(v)}</li>" for v in engine["loaded"]) or "<li>none</li>"
        body.append(f'<h2>The engine</h2><div class="card">base <strong>'
                    f'{escape(engine["base"])}</strong> · {engine["loads"]} adapter loads '
                    f'(cold) since start · {engine["tokens_per_second"]:.1f} tokens/s over the '
                    f'last minute</div><h2>Adapter versions loaded</h2><ul id="loaded">{loaded}</ul>')
        if engine["failed"]:
            failed = "".join(f"<li>{escape(name)}: <span class=muted>{escape(reason)}</span></li>"
                             for name, reason in engine["failed"].items())
            body.append(f'<h2>Adapter versions the engine could not load</h2>'
                        f'<ul id="failed">{failed}</ul>')
    return page("Usage", "".join(body), viewer, "usage", served)


# -- the playground and signing in ----------------------------------------------------------

def playground_page(viewer: Viewer, base: str, adapters: list[str]) -> str:
    choices = [base, *adapters]
    boxes = "".join(f'<label><input type="checkbox" name="model" value="{escape(m)}"'
                    f'{" checked" if i < 2 else ""}> {escape(m)}</label><br>'
                    for i, m in enumerate(choices))
    body = (f"<h1>Playground</h1><p class=muted>One prompt, answered by each model you pick, "
            f"side by side as they are generated, through this server's OpenAI API with your "
            f"key.</p><form class=card id=playground>"
            f'<textarea name="prompt" rows="3" cols="80">What is the capital of France?</textarea>'
            f'<p>{boxes}</p><p>max tokens <input type="number" name="max_tokens" value="48" '
            f'min="1" max="512"> <button id="run">Run</button></p></form>'
            f'<div id="answers" class="grid"></div>')
    return page("Playground", body, viewer, "playground")


def login_page(error: str | None = None) -> str:
    message = f'<p class="warn">{escape(error)}</p>' if error else ""
    body = (f"<h1>Sign in</h1>{message}<form class=card method=post action=\"{href('login')}\" "
            f'id=login><p>Your API key (the one you call the API with)</p>'
            f'<p><input type="password" name="key" size="48" autocomplete="off"> '
            f"<button>Sign in</button></p></form>")
    return page("Sign in", body, Viewer(None, (), signed_in=False), "", served=False)
