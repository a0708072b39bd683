"""Hub commands: push and sync (pull lives with the catalog commands)."""

from __future__ import annotations

import sys

import click

from zoo.cli.app import cli

TOKEN_HELP = "Hub token (default: HF_TOKEN). Never stored or printed."


def _log(line: str) -> None:
    click.echo(line, err=True)


@cli.command("push")
@click.argument("name")
@click.option("--repo", default=None, help="ORG/NAME on the Hub (default: NAME, or USER/NAME).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, help="Branch to commit to (created when missing).")
@click.option("--token", default=None, help=TOKEN_HELP)
def push_cmd(name, repo, private, revision, token) -> None:
    """Upload an adapter, its model card and zoo.json to a Hub repo."""
    from zoo.hub.push import push

    result = push(name, repo=repo, private=private, revision=revision, token=token)
    if result.changed:
        click.echo(f"pushed {name} to {result.repo} (commit {result.commit})")
    else:
        click.echo(f"{name} is unchanged on {result.repo}: no new commit ({result.commit})")


@cli.command("sync")
@click.option("--repo", "index", required=True, help="Dataset repo ORG/INDEX holding the catalog.")
@click.option("--token", default=None, help=TOKEN_HELP)
def sync_cmd(index, token) -> None:
    """Merge this zoo's catalog with a shared one on the Hub (a union by content hash)."""
    from zoo.hub.sync import sync

    result = sync(index, token=token, log=_log)
    for label, names in (("pushed", result.pushed), ("published to the index", result.published),
                         ("pulled", result.pulled)):
        if names:
            click.echo(f"{label}: {', '.join(names)}")
    for name, why in result.unavailable:
        click.echo(f"not available here: {name} ({why})")
    for name, mine, theirs in result.conflicts:
        click.echo(f"CONFLICT {name}: here {mine[:19]}, in {index} {theirs[:19]} "
                   "(left as is on both sides; rename one with zoo rm/add)")
    if not any((result.pushed, result.published, result.pulled, result.conflicts)):
        click.echo(f"in sync with {index}")
    if result.conflicts:
        sys.exit(1)
