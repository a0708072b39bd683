"""The serve command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from zoo.cli.app import DEBUG_VARIABLE, cli
from zoo.core.tables import DEFAULT_ROUTER_POLICY as DEFAULT_POLICY
from zoo.core.tables import ROUTER_POLICIES as POLICIES

PORT = click.IntRange(1, 65535)


@cli.command("serve", context_settings={"ignore_unknown_options": True})
@click.option("--multi-lora", is_flag=True, required=True,
              help="Serve every servable adapter of the base from one engine.")
@click.option("--base", default=None, help="Base to serve (default: the embedded one).")
@click.option("--quantization", type=click.Choice(["w8a8", "none", "nf4"]), default="w8a8",
              show_default=True,
              help="w8a8: int8 weights and activations; nf4: GPU only (vllm-bnb-plugin).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=PORT, default=8000, show_default=True)
@click.option("--max-loras", type=click.IntRange(min=1), default=None,
              help="Adapters in one batch (default: 256, fewer when the slots would take "
                   "more than 15% of memory for what the adapters train, 25% for all).")
@click.option("--max-cpu-loras", type=click.IntRange(min=1), default=None,
              help="Adapters kept loaded (LRU); default: 4 x --max-loras, at most 512.")
@click.option("--api-keys", type=click.Path(path_type=Path), default=None,
              help="JSON file of tenants and their keys; without it the server is open.")
@click.option("--dtype", default="auto", show_default=True,
              help="Activation dtype; auto: bfloat16 on CPUs with AMX or AVX-512 BF16 (the "
                   "int8 AMX kernel needs it), float32 on others (fastest there).")
@click.option("--scheduling", type=click.Choice(["fair", "fcfs"]), default="fair",
              show_default=True,
              help="fair: requests admitted by tenant, in proportion to their weights "
                   "(virtual token counter); fcfs: vLLM's first come, first served.")
@click.option("--lora-targets", type=click.Choice(["all", "catalog"]), default="all",
              show_default=True,
              help="LoRA layers on every module vLLM can adapt, or only on those the served "
                   "adapters train (an adapter or version added later that trains more is "
                   "refused until a restart; little faster now that a layer no adapter of "
                   "the step trains runs as its base layer).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Engines of the same base behind vllm-router on --port (each with its "
                   "share of the cores, or its own GPU with --gpus).")
@click.option("--router-policy", type=click.Choice(POLICIES), default=DEFAULT_POLICY,
              show_default=True, help="How vllm-router spreads requests over --replicas.")
@click.option("--gpus", type=click.IntRange(min=0), default=0,
              help="GPUs to spread --replicas over (0: CPU).")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve_cmd(multi_lora, base, quantization, host, port, max_loras, max_cpu_loras, api_keys,
              dtype, scheduling, lora_targets, replicas, router_policy, gpus,
              vllm_args) -> None:
    """Serve a base and its adapters with vLLM (OpenAI API); extra options go to vLLM."""
    from zoo.serve.launch import (
        ServeOptions,
        check_address,
        describe,
        plan_serve,
        prepare_base,
        run_server,
    )

    check_address(host, port)  # before minutes of calibration and start-up
    options = ServeOptions(base=base, quantization=quantization, host=host, port=port,
                           max_loras=max_loras, max_cpu_loras=max_cpu_loras, api_keys=api_keys,
                           dtype=dtype, scheduling=scheduling, lora_targets=lora_targets,
                           extra_args=tuple(vllm_args))
    if replicas != 1:
        from zoo.serve.replicas import serve_replicas

        sys.exit(serve_replicas(options, replicas, router_policy, gpus=gpus,
                                log=lambda line: click.echo(line, err=True)))
    prepare_base(options, log=lambda line: click.echo(line, err=True))
    plan = plan_serve(options)
    for line in describe(plan, options):
        click.echo(line, err=True)
    if os.environ.get(DEBUG_VARIABLE):
        click.echo("vLLM command: " + " ".join(plan.argv), err=True)
    sys.exit(run_server(plan))


@cli.command("route")
@click.option("--worker", "workers", multiple=True, required=True,
              help="URL of a running 'zoo serve' (repeatable), e.g. http://10.0.0.2:8000.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=PORT, default=8000, show_default=True)
@click.option("--policy", type=click.Choice(POLICIES), default=DEFAULT_POLICY,
              show_default=True)
def route_cmd(workers, host, port, policy) -> None:
    """vLLM's router alone, in front of 'zoo serve' instances on other machines."""
    from zoo.serve.replicas import route

    sys.exit(route(list(workers), host, port, policy,
                   log=lambda line: click.echo(line, err=True)))


@cli.group("keys")
def keys_group() -> None:
    """API keys of the tenants of 'zoo serve --api-keys FILE'."""


def keys_file(help: str = "The keys file."):  # noqa: A002 - click's name
    return click.option("--file", "path", type=click.Path(path_type=Path), required=True,
                        help=help)


@keys_group.command("add")
@click.argument("tenant")
@keys_file("The keys file (created when missing).")
@click.option("--adapters", multiple=True,
              help="Patterns of the adapters TENANT may use (default: TENANT/*); repeatable.")
def keys_add_cmd(tenant: str, path: Path, adapters: tuple[str, ...]) -> None:
    """Make a new key for TENANT; the file keeps only its SHA-256, so it is shown once."""
    from zoo.serve.policy import add_key

    key = add_key(path, tenant, adapters)
    click.echo(key)
    click.echo(f"added a key for {tenant} to {path}; it is shown only now", err=True)


@keys_group.command("list")
@keys_file()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def keys_list_cmd(path: Path, as_json: bool) -> None:
    """Tenants, their keys' fingerprints (never the keys), adapters, weight and limits."""
    import json

    from zoo.serve.policy import fingerprint, load_tenants

    rows = [{"tenant": t.name, "keys": [fingerprint(k) for k in t.keys],
             "adapters": list(t.adapters), "weight": t.weight, "limits": t.limits}
            for t in load_tenants(path)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        limits = ", ".join(f"{k} {v}" for k, v in row["limits"].items()) or "no limits"
        click.echo(f"{row['tenant']}: keys {', '.join(row['keys'])}; adapters "
                   f"{', '.join(row['adapters'])}; weight {row['weight']:g}; {limits}")


@keys_group.command("revoke")
@click.argument("tenant")
@keys_file()
@click.option("--key", default=None,
              help="The key, or the start of its fingerprint ('zoo keys list').")
@click.option("--all", "everything", is_flag=True, help="Remove TENANT and all its keys.")
def keys_revoke_cmd(tenant: str, path: Path, key: str | None, everything: bool) -> None:
    """Remove a key of TENANT (or, with --all, the tenant): a running server refuses it from
    its next request on."""
    from zoo.serve.policy import revoke_key

    if (key is None) == (not everything):
        raise click.UsageError("give --key KEY or --all")
    removed = revoke_key(path, tenant, key)
    click.echo(f"revoked {removed} key{'s' if removed != 1 else ''} of {tenant}"
               f"{' and the tenant' if everything else ''} in {path}")


@cli.command("usage")
@click.option("--tenant", default=None, help="One tenant's rows only.")
@click.option("--since", default=None,
              help="From this date (YYYY-MM-DD) or this long ago (30m, 12h, 7d).")
@click.option("--by", type=click.Choice(["adapter", "tenant", "day"]), default="adapter",
              show_default=True, help="Group by adapter version and tenant, tenant, or day.")
@click.option("--csv", "as_csv", is_flag=True, help="Comma-separated values.")
def usage_cmd(tenant, since, by, as_csv) -> None:
    """Requests and tokens served, from the home's durable meter (every server, every
    replica, across restarts)."""
    import csv
    import io

    from zoo.catalog.registry import Registry
    from zoo.serve.meter import Meter, parse_since

    meter = Meter(Registry().home, server=0)
    rows = meter.report(tenant=tenant, since=parse_since(since), by=by)
    if as_csv:
        out = io.StringIO()
        if rows:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        click.echo(out.getvalue(), nl=False)
        return
    if not rows:
        click.echo("no usage recorded", err=True)
        return
    columns = list(rows[0])
    table = [columns, *[[str(r[c]) for c in columns] for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@cli.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=PORT, default=8080, show_default=True)
@click.option("--api-keys", type=click.Path(path_type=Path), default=None,
              help="Keys file: visitors sign in and see their own adapters and usage.")
def ui_cmd(host: str, port: int, api_keys: Path | None) -> None:
    """The catalog pages alone, without an engine (zoo serve shows them under /zoo/ui/)."""
    from zoo.catalog.registry import Registry
    from zoo.ui.web import serve_pages

    click.echo(f"zoo's pages on http://{host}:{port}/ (read-only; Ctrl-C stops)", err=True)
    serve_pages(Registry().home, host, port, api_keys)
