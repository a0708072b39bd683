"""Catalog commands: add, list, show, verify, rm, pull."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from zoo.catalog.registry import Registry, filter_entries
from zoo.cli.app import NEW_VERSION_HELP, cli, explain, version_label
from zoo.core.records import ADAPTER_KINDS, BASE_KINDS, AdapterEntry, BaseEntry, Entry
from zoo.errors import MalformedEntry, ZooError

KIND_CHOICES = click.Choice(["base", "merged", "adapter", *ADAPTER_KINDS])


def entry_view(entry: Entry, registry: Registry, catalog=None) -> dict:
    """An entry as ``zoo show --json`` prints it: absolute paths, derived facts."""
    view = entry.to_dict()
    view["path"] = str(registry.resolve(entry.path)) if entry.path else None
    if isinstance(entry, BaseEntry):
        for variant in view["variants"].values():
            variant["path"] = str(registry.resolve(variant["path"])) if variant["path"] else None
    elif catalog is not None and entry.servable:
        base = catalog.entries.get(entry.base)
        view["served_on"] = "w8a8" if isinstance(base, BaseEntry) and "w8a8" in base.variants \
            else "original"
    return view


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


@cli.command("add")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Registry name: NAME or ORG/NAME.")
@click.option("--base", default=None, help="Base it belongs to (NAME, or NAME@nf4 for QLoRA).")
@click.option("--many", is_flag=True,
              help="PATH holds one adapter folder each: register them all, one transaction.")
@click.option("--prefix", default="", help="With --many: prepended to each folder's name.")
@click.option("--new-version", is_flag=True, help=NEW_VERSION_HELP)
def add_cmd(path: Path, name: str | None, base: str | None, many: bool, prefix: str,
            new_version: bool) -> None:
    """Inspect an adapter or model directory, copy it into the zoo and register it."""
    if many:
        from zoo.catalog.bulk import add_many

        if name is not None or base is None:
            raise click.UsageError("--many takes --base (and --prefix), not --name")
        result = add_many(path, base, prefix)
        for folder, reason in result.refused:
            click.echo(f"refused {folder}: {reason}", err=True)
        click.echo(f"added {len(result.added)} adapters on {base}"
                   f"{f', refused {len(result.refused)}' if result.refused else ''}")
        if result.refused:
            sys.exit(1)
        return
    from zoo.catalog.store import add

    if name is None:
        raise click.UsageError("Missing option '--name' (or --many for a folder of adapters).")
    entry = add(path, name, base, new_version=new_version)
    detail = f" on {entry.base}" if isinstance(entry, AdapterEntry) else ""
    click.echo(f"added {version_label(entry)} ({entry.kind}{detail}, {len(entry.files)} files)")
    if isinstance(entry, AdapterEntry) and entry.version > 1:
        click.echo(f"it serves nobody until 'zoo promote {entry.name} v{entry.version}'")
    if isinstance(entry, AdapterEntry) and not entry.servable:
        click.echo(f"note: vLLM cannot serve it: {entry.servable_reason}")


@cli.command("list")
@click.option("--base", default=None, help="Only entries of this base.")
@click.option("--kind", type=KIND_CHOICES, default=None, help="Only entries of this kind.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_cmd(base: str | None, kind: str | None, as_json: bool) -> None:
    """List registered bases and adapters."""
    registry = Registry()
    malformed: dict[str, str] = {}  # left out of the list, each named after it
    entries = filter_entries(registry.load(), base=base, kind=kind, fields=LISTED_FIELDS,
                             malformed=malformed)
    if as_json:
        _echo_json([_summary(e) for e in entries])
    elif entries:
        rows = [("NAME", "KIND", "BASE", "RANK", "PARAMS", "SERVABLE")]
        for e in entries:
            s = _summary(e)
            rows.append((s["name"], s["kind"], s["base"] or "-", str(s.get("rank") or "-"),
                         _human(s["params"]),
                         {True: "yes", False: "no", None: "-"}[s["servable"]]))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    elif not malformed:
        click.echo("the zoo is empty: try 'zoo pull smollm2-135m-instruct'", err=True)
    for name, why in malformed.items():  # the rest listed; the status says not all were
        error = MalformedEntry(name, why)
        click.echo(f"error: {error.message}, left out of this list. {error.hint}", err=True)
    if malformed:
        sys.exit(1)


LISTED_FIELDS = {"base": ("name", "kind", "base", "parameters", "variants"),
                 "adapter": ("name", "kind", "base", "base_variant", "rank", "trainable_params",
                             "servable")}


def _summary(entry: dict) -> dict:
    """The fields ``zoo list`` shows, from an entry's stored dict."""
    if entry["kind"] in BASE_KINDS:
        return {"name": entry["name"], "kind": entry["kind"], "base": entry.get("base"),
                "params": entry["parameters"], "servable": None,
                "variants": sorted(entry.get("variants", {}))}
    return {"name": entry["name"], "kind": entry["kind"], "base": entry["base"],
            "base_variant": entry["base_variant"], "rank": entry["rank"],
            "params": entry["trainable_params"], "servable": entry["servable"]}


def _human(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


@cli.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show_cmd(name: str, as_json: bool) -> None:
    """Show everything the registry knows about one entry (NAME:vN: one version)."""
    from zoo.catalog import versions

    registry = Registry()
    catalog = registry.load()
    entry = versions.resolve(catalog, name) if versions.SEPARATOR in name else catalog.get(name)
    view = entry_view(entry, registry, catalog)
    if as_json:
        _echo_json(view)
        return
    for key, value in view.items():
        if isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True) if key != "files" else \
                ", ".join(f"{f} ({v['size']} B)" for f, v in value.items())
        click.echo(f"{key:>17}: {value}")


@cli.command("verify")
@click.argument("name", required=False)
def verify_cmd(name: str | None) -> None:
    """Re-hash stored files; exit status 1 and the changed files when anything differs."""
    from zoo.catalog.store import verify

    results = verify(name)
    bad = [r for r in results if not r.ok]
    for r in results:
        click.echo(f"{r.name}: {'ok' if r.ok else 'CHANGED ' + ', '.join(r.changed)}")
    if bad:
        sys.exit(1)


@cli.command("rm")
@click.argument("name")
def rm_cmd(name: str) -> None:
    """Unregister an entry and delete its stored files (every version; NAME:vN: one)."""
    from zoo.catalog.store import remove

    entry = remove(name)
    click.echo(f"removed {version_label(entry) if ':' in name else entry.name} ({entry.kind})")


@cli.command("pull")
@click.argument("refs", metavar="REF...", nargs=-1, required=True)
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN). Never stored.")
@click.option("--name", default=None,
              help="Register a Hub repo under this name (default: the repo id; one REF only).")
@click.option("--base", default=None,
              help="The base of an adapter repo (NAME or NAME@nf4), as on 'zoo add'.")
@click.option("--with-base", is_flag=True,
              help="Also pull an adapter's base from the Hub when this zoo lacks it.")
@click.option("--new-version", is_flag=True, help="For an adapter repo: " + NEW_VERSION_HELP)
@click.option("--subfolder", default=None, metavar="FOLDER",
              help="The folder of the Hub repo that holds the adapter or model (a repo of "
                   "several, or of a run's checkpoints); default name ORG/NAME-FOLDER.")
@click.option("--gguf", default=None, metavar="FILE",
              help="For a repo of GGUF files: the one to build a 16-bit base from (default: "
                   "its only one).")
def pull_cmd(refs: tuple[str, ...], token: str | None, name: str | None, base: str | None,
             with_base: bool, new_version: bool, subfolder: str | None,
             gguf: str | None) -> None:
    """Fetch or build catalog entries (short names, or ORG/NAME[@REVISION] from the Hub, or
    a repo's address on it: a PEFT or zoo adapter, a base model, a merged one, or a base
    built from a GGUF file; 'ORG/PATTERN' pulls every repo of ORG it matches, as
    'acme/customer-*'). With several, each is pulled in turn; one that fails is named and
    the rest go on (exit status 1)."""
    from zoo.apps.pull import pull
    from zoo.hub.pull import is_pattern, repos_matching

    if (len(refs) > 1 or is_pattern(refs[0])) and (name or gguf):
        raise click.UsageError(f"--{'name' if name else 'gguf'} names one entry: give one REF")
    if any(map(is_pattern, refs)):
        refs = tuple(r for ref in refs for r in (
            repos_matching(ref, token) if is_pattern(ref) else [ref]))
        click.echo(f"{len(refs)} to pull", err=True)

    def one(ref: str) -> None:
        result = pull(ref, log=lambda line: click.echo(line, err=True), token=token, name=name,
                      base=base, with_base=with_base, new_version=new_version,
                      subfolder=subfolder, gguf=gguf)
        click.echo(result.message)

    if len(refs) == 1:
        return one(refs[0])
    failed = []
    for ref in refs:
        try:
            one(ref)
        except ZooError as exc:  # named, and the others go on
            click.echo(f"error: {ref}: {explain(exc)}", err=True)
            failed.append(ref)
    click.echo(f"pulled {len(refs) - len(failed)} of {len(refs)}"
               f"{'; failed: ' + ', '.join(failed) if failed else ''}")
    if failed:
        sys.exit(1)
