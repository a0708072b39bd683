"""Version commands: versions, promote, rollback, alias, gc."""

from __future__ import annotations

import json
from pathlib import Path

import click

from zoo.cli.app import cli


def _log(line: str) -> None:
    click.echo(line, err=True)


@cli.command("versions")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def versions_cmd(name: str, as_json: bool) -> None:
    """List an adapter's versions and what each alias points at."""
    from zoo.catalog.registry import Registry
    from zoo.catalog.versions import describe

    view = describe(Registry().load().adapter(name))
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    rows = [("VERSION", "ALIASES", "CONTENT", "CREATED", "SOURCE", "LOSS")]
    for v in view["versions"]:
        losses = ", ".join(f"{k} {e['loss']:.4f}" for k, e in v["evaluations"].items())
        rows.append((f"v{v['version']}", ",".join(v["aliases"]) or "-", v["content_hash"][7:19],
                     v["created"], v["source"], losses or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if view["canary"]:
        click.echo(f"canary: v{view['canary']['version']} gets {view['canary']['percent']}% of "
                   f"{name}'s requests (sticky per end user)")


@cli.command("promote")
@click.argument("name")
@click.argument("version", required=False)
@click.option("--canary", type=float, default=None, metavar="PERCENT",
              help="Send this share of NAME's requests to VERSION instead of making it "
                   "current (sticky per end user).")
@click.option("--end-canary", is_flag=True, help="Stop the canary: every request to the current.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Held-out data for the gate (default: recorded with the adapter).")
@click.option("--max-regression", type=float, default=None,
              help="Largest relative rise of held-out loss allowed (default 0.02).")
@click.option("--force", is_flag=True, help="Promote even if the gate refuses (recorded).")
def promote_cmd(name, version, canary, end_canary, data, max_regression, force) -> None:
    """Make VERSION (vN or an alias) of NAME current, or its canary, after an evaluation
    gate: refused when its held-out loss is worse than the current version's."""
    from zoo.apps.rollout import DEFAULT_MAX_REGRESSION, promote
    from zoo.catalog.registry import Registry
    from zoo.catalog.versions import end_canary as stop_canary

    if end_canary:
        if version or canary is not None:
            raise click.UsageError("--end-canary takes the name alone")
        entry = stop_canary(Registry(), name)
        click.echo(f"{name}: canary ended, every request to v{entry.version}")
        return
    if version is None:
        raise click.UsageError("give the VERSION to promote (vN or an alias)")
    ref = f"{name.partition(':')[0]}:{version}"
    result = promote(ref, canary, data, max_regression if max_regression is not None
                     else DEFAULT_MAX_REGRESSION, force, log=_log)
    if result.gate is not None:
        g = result.gate
        click.echo(f"gate: held-out loss {g.candidate.loss:.4f} (candidate) against "
                   f"{g.current.loss:.4f} (current) on {g.current.data}: "
                   f"{100 * g.change:+.2f}%{' (forced)' if result.forced and not g.passed else ''}")
    entry = result.entry
    if canary is not None:
        click.echo(f"{entry.name}: v{entry.canary['version']} answers {canary}% of requests, "
                   f"v{entry.version} the rest")
    else:
        click.echo(f"{entry.name}: v{entry.version} is current (previous: "
                   f"v{entry.aliases['previous']}; 'zoo rollback {entry.name}' returns to it)")


@cli.command("rollback")
@click.argument("name")
def rollback_cmd(name: str) -> None:
    """Return NAME to its previous current version in one step (ending any canary)."""
    from zoo.catalog.registry import Registry
    from zoo.catalog.versions import refused_by_running_servers, rollback

    registry = Registry()
    entry = rollback(registry, name)  # the way back is never held up: a refusal is told
    click.echo(f"{entry.name}: v{entry.version} is current again "
               f"(v{entry.aliases['previous']} kept)")
    for refusal in refused_by_running_servers(registry.home, entry):
        _log(f"warning: {entry.name}:v{entry.version} is current again, and refused by "
             f"{refusal}")


@cli.command("alias")
@click.argument("ref")
@click.argument("alias")
def alias_cmd(ref: str, alias: str) -> None:
    """Point ALIAS of an adapter at a version: zoo alias acme/x:v3 champion."""
    from zoo.catalog.registry import Registry
    from zoo.catalog.versions import set_alias

    entry = set_alias(Registry(), ref, alias)
    click.echo(f"{entry.name}:{alias} -> v{entry.aliases[alias]}")


@cli.command("gc")
@click.argument("name")
@click.option("--keep", type=click.IntRange(min=0), required=True,
              help="Newest versions to keep besides the protected ones.")
def gc_cmd(name: str, keep: int) -> None:
    """Remove old versions' files: never the current one, a canary, an aliased one, or one
    a running server is answering with."""
    from zoo.catalog.registry import Registry
    from zoo.catalog.versions import in_use, remove_versions

    registry = Registry()
    removed = remove_versions(registry, name, None, keep=keep, in_use=in_use(registry.home))
    click.echo(f"{name}: removed {', '.join(f'v{n}' for n in removed)}" if removed
               else f"{name}: nothing to remove")
