"""Model commands: train, generate, quantize, merge, dequantize; adapter algebra: compress,
extract, similarity (and merge --to-adapter)."""

from __future__ import annotations

from pathlib import Path

import click

from zoo.cli.app import NEW_VERSION_HELP, cli, version_label
from zoo.core.tables import COMBINE_METHODS, TRAIN_METHODS, VERIFY_MODES


def _log(line: str) -> None:
    click.echo(line, err=True)


@cli.command("train")
@click.option("--base", required=True, help="Registered base to train on.")
@click.option("--method", type=click.Choice(TRAIN_METHODS), required=True)
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="JSONL: {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}.")
@click.option("--name", required=True, help="Registry name of the new adapter.")
@click.option("--rank", type=int, default=None, help="LoRA r (8), or bottleneck size m (d/16).")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (2 x rank).")
@click.option("--targets", default="q_proj,v_proj", show_default=True,
              help="Comma-separated LoRA target modules.")
@click.option("--epochs", type=int, default=None, help="Passes over the data (default 1).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (instead of --epochs).")
@click.option("--lr", type=float, default=None, help="Learning rate (2e-4 LoRA, 1e-3 bottleneck).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-split", type=float, default=0.1, show_default=True,
              help="Fraction of examples held out for the eval loss.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--new-version", is_flag=True, help=NEW_VERSION_HELP)
def train_cmd(base, method, data, name, rank, alpha, targets, epochs, steps, lr, seed,
              eval_split, batch_size, new_version) -> None:
    """Train a LoRA, QLoRA or bottleneck adapter and register it when it finishes."""
    from zoo.train import TrainOptions, train

    if epochs is not None and steps is not None:
        raise click.UsageError("give --epochs or --steps, not both")
    options = TrainOptions(base=base, method=method, data=data, name=name, rank=rank,
                           alpha=alpha, targets=tuple(t for t in targets.split(",") if t),
                           epochs=epochs, steps=steps, lr=lr, seed=seed, eval_split=eval_split,
                           batch_size=batch_size, new_version=new_version)
    result = train(options, log=_log)
    m = result.metrics
    click.echo(f"registered {version_label(result.entry)}: {m['steps']} steps in "
               f"{m['seconds']} s, train loss "
               f"{m['train_loss_first']} -> {m['train_loss']}, eval loss "
               f"{m['eval_loss_before']} -> {m['eval_loss']}")


@cli.command("generate")
@click.argument("prompt")
@click.option("--adapter", default=None, help="Registered adapter (any kind).")
@click.option("--base", default=None, help="Registered base, without an adapter.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
def generate_cmd(prompt: str, adapter: str | None, base: str | None, max_tokens: int) -> None:
    """Greedy answer from an adapter (or a base) through transformers, without a server."""
    from zoo.inference.generate import generate

    click.echo(generate(prompt, adapter=adapter, base=base, max_new_tokens=max_tokens))


@cli.command("quantize")
@click.argument("base")
@click.option("--scheme", type=click.Choice(["nf4", "w8a8"]), required=True,
              help="nf4: QLoRA's base (bitsandbytes); w8a8: int8 for vLLM on CPU.")
@click.option("--force", is_flag=True, help="Rebuild even when an intact variant exists.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="w8a8: text or JSONL to calibrate on (default: text that ships with zoo).")
@click.option("--no-calibrate", is_flag=True,
              help="w8a8: plain round-to-nearest, no SmoothQuant and no 16-bit layers.")
@click.option("--weight-bits", type=click.Choice(["8", "7"]), default=None,
              help="w8a8: the weights' width (default: 8, or 7 where vLLM's oneDNN GEMM "
                   "serves without VNNI and saturates 8-bit weights' products: x86 without "
                   "AVX2, or ZOO_CPU_INT8=0).")
@click.option("--eval/--no-eval", "evaluate_after", default=True, show_default=True,
              help="Measure held-out perplexity of the base and the variant (zoo eval).")
def quantize_cmd(base: str, scheme: str, force: bool, calibration: Path | None,
                 no_calibrate: bool, weight_bits: str | None, evaluate_after: bool) -> None:
    """Write a quantized variant of a base and register it as BASE@SCHEME."""
    from zoo.quantize import quantize

    variant = quantize(base, scheme, force=force, log=_log, calibration=calibration,
                       calibrate=not no_calibrate, bits=weight_bits and int(weight_bits))
    size = sum(f["size"] for f in variant.files.values())
    click.echo(f"{base}@{scheme}: {len(variant.files)} files, {size / 1e6:.1f} MB")
    if variant.quantization.get("weight_bits") == 7:
        click.echo("weights in 7 bits (-63..63): vLLM's oneDNN int8 GEMM on x86 without VNNI "
                   "saturates 8-bit weights' products")
    kept = variant.quantization.get("kept_16bit")
    if kept:
        click.echo(f"kept in 16 bits (int8 error above {variant.quantization['keep_tolerance']}):"
                   f" {', '.join(kept)}")
    if evaluate_after:
        from zoo.apps.evaluate import compare_domains

        _echo_domains(compare_domains(base, scheme, log=_log), scheme)


def _echo_domains(rows, variant: str) -> None:
    """Each held-out text's perplexity in 16 bits and in ``variant``, worst ratio first."""
    click.echo(f"{'held-out text':<14} {'tokens':>6} {'16-bit':>8} {variant:>8} {'ratio':>7}")
    for row in rows:
        click.echo(f"{row.domain:<14} {row.tokens:>6} {row.original:>8.2f} {row.variant:>8.2f}"
                   f" {row.ratio:>7.3f}")
    worst = rows[0]
    click.echo(f"worst: {worst.domain}, x{worst.ratio:.3f} the 16-bit perplexity")


@cli.command("eval")
@click.argument("name")
@click.option("--variant", type=click.Choice(["original", "nf4", "w8a8"]), default=None,
              help="Base variant to run on (default: the base's original, an adapter's own).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="JSONL of the training formats, or plain text (default: zoo's held-out text).")
@click.option("--domains", is_flag=True,
              help="A base's quantized variant against its original on every held-out domain "
                   "zoo ships (prose, dialogue, code, formal, technical, Spanish).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(name: str, variant: str | None, data: Path | None, domains: bool,
             as_json: bool) -> None:
    """Held-out loss and perplexity of a base or an adapter (kept in 'zoo show'); a base's
    quantized variant is also compared with its original on the same text."""
    import json

    from zoo.apps.evaluate import compare_domains, evaluate, versus_original

    if domains:
        if data is not None or variant in (None, "original"):
            raise click.UsageError("--domains takes a base and --variant nf4 or w8a8, no --data")
        rows = compare_domains(name, variant, log=_log)
        if as_json:
            click.echo(json.dumps([{"domain": r.domain, "tokens": r.tokens,
                                    "original": round(r.original, 4),
                                    "variant": round(r.variant, 4), "ratio": round(r.ratio, 4)}
                                   for r in rows], indent=2))
        else:
            _echo_domains(rows, variant)
        return
    result = evaluate(name, variant, data, log=_log)
    original = versus_original(name, result, data, log=_log)
    if as_json:
        extra = {"original_perplexity": round(original.perplexity, 4),
                 "ratio": round(result.perplexity / original.perplexity, 4)} if original else {}
        click.echo(json.dumps({"name": result.name, "variant": result.variant,
                               **result.record(), **extra}, indent=2))
        return
    click.echo(f"{name} on {result.variant}: loss {result.loss:.4f}, perplexity "
               f"{result.perplexity:.2f} over {result.tokens} tokens of {result.data} "
               f"({result.engine})")
    if original:
        click.echo(f"x{result.perplexity / original.perplexity:.3f} the original's perplexity "
                   f"({original.perplexity:.2f}) on the same text")


@cli.command("merge")
@click.option("--adapter", "adapters", multiple=True, required=True,
              help="Adapter to fold in (repeat for several: a weighted sum of their deltas).")
@click.option("--weights", default=None, help="Comma-separated weight per adapter (default 1).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write here only, without registering.")
@click.option("--name", default=None, help="Registry name of the result (default ADAPTER-merged).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Output dtype (default: the base's).")
@click.option("--qlora-base", type=click.Choice(["dequantized", "original"]),
              default="dequantized", show_default=True,
              help="Fold a QLoRA into its dequantized NF4 base (what it was trained on) "
                   "or into the original 16-bit weights.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--verify", "verify", type=click.Choice(VERIFY_MODES),
              default="modules", show_default=True,
              help="modules: each merged weight against PEFT's LoRA layer, streamed; full: "
                   "also the whole model's logits (holds two models in memory).")
@click.option("--no-verify", is_flag=True, help="Same as --verify none.")
@click.option("--to-adapter", default=None, metavar="NAME",
              help="Combine the adapters into one LoRA adapter NAME instead of a full model.")
@click.option("--method", type=click.Choice(COMBINE_METHODS),
              default="linear", show_default=True, help="How --to-adapter combines.")
@click.option("--rank", type=int, default=None,
              help="Rank of --to-adapter's result (linear: sum of ranks, exact; others: the "
                   "largest rank).")
@click.option("--density", type=float, default=0.5, show_default=True,
              help="Share of each update ties / dare_linear keep.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare_linear's drops.")
@click.option("--new-version", is_flag=True, help="With --to-adapter: " + NEW_VERSION_HELP)
def merge_cmd(adapters, weights, out, name, dtype, qlora_base, force, verify, no_verify,
              to_adapter, method, rank, density, seed, new_version) -> None:
    """Fold adapters into their base (standalone weights that load without PEFT), or
    combine them into one adapter with --to-adapter."""
    parsed = _weights(weights)
    if to_adapter is not None:
        from zoo.merge.algebra import CombineOptions, combine

        if out or name or dtype or force:
            raise click.UsageError("--to-adapter registers an adapter: --out, --name, --dtype "
                                   "and --force apply to full-model merges")
        _report_algebra(combine(CombineOptions(
            adapters=tuple(adapters), name=to_adapter, weights=parsed, method=method, rank=rank,
            density=density, seed=seed, new_version=new_version), log=_log))
        return
    from zoo.merge import MergeOptions, merge

    result = merge(MergeOptions(adapters=tuple(adapters), weights=parsed, out=out, name=name,
                                dtype=dtype, qlora_base=qlora_base, force=force,
                                verify="none" if no_verify else verify), log=_log)
    _report_merge(result)


def _weights(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise click.BadParameter("comma-separated numbers", param_hint="--weights") from None


@cli.command("compress")
@click.argument("name")
@click.option("--rank", type=int, required=True, help="Rank of the result.")
@click.option("--name", "new_name", default=None, help="Registry name (default NAME-rR).")
@click.option("--new-version", is_flag=True, help=NEW_VERSION_HELP)
def compress_cmd(name, rank, new_name, new_version) -> None:
    """The best rank-R approximation of an adapter (a DoRA adapter becomes a plain LoRA)."""
    from zoo.merge.algebra import compress

    _report_algebra(compress(name, rank, new_name, log=_log, new_version=new_version))


@cli.command("extract")
@click.option("--model", required=True,
              help="Fine-tuned or merged model: a registered name or a directory.")
@click.option("--base", required=True, help="The registered base it was tuned from.")
@click.option("--rank", type=int, required=True)
@click.option("--name", required=True, help="Registry name of the new adapter.")
def extract_cmd(model, base, rank, name) -> None:
    """A LoRA adapter from a full fine-tune and its base (weight differences at rank R)."""
    from zoo.merge.algebra import extract

    _report_algebra(extract(model, base, rank, name, log=_log))


@cli.command("similarity")
@click.argument("first")
@click.argument("second")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Heatmap PNG (default similarity-FIRST-SECOND.png).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def similarity_cmd(first, second, plot, as_json) -> None:
    """Subspace similarity of two adapters' updates per module (LoRA paper's phi)."""
    import json

    from zoo.merge.algebra import similarity, similarity_plot, similarity_rows

    result = similarity(first, second)
    rows = similarity_rows(result)
    plot = plot or Path(f"similarity-{first}-{second}.png".replace("/", "_"))
    similarity_plot(result, plot)
    if as_json:
        click.echo(json.dumps({"ranks": list(result.ranks), "modules": rows, "plot": str(plot)},
                              indent=2))
        return
    columns = list(rows[0])
    width = max(len(r["module"]) for r in rows)
    click.echo("  ".join([columns[0].ljust(width), *columns[1:]]))
    for row in rows:
        click.echo("  ".join([row["module"].ljust(width),
                              *(f"{row[c]:.3f}".ljust(len(c)) for c in columns[1:])]))
    mean = result.mean()
    click.echo(f"mean phi(1,1) {float(mean[0, 0]):.3f}, phi({result.ranks[0]},{result.ranks[1]}) "
               f"{float(mean[-1, -1]):.3f}; heatmap: {plot}")


def _report_algebra(result) -> None:
    entry = result.entry
    serving = "servable by vLLM" if entry.servable else f"not servable: {entry.servable_reason}"
    click.echo(f"registered {version_label(entry)}: LoRA rank {result.rank} on "
               f"{result.modules} modules, {serving}")
    worst = f" (worst module {result.worst_module[0]}: {100 * result.worst_module[1]:.1f}%)" \
        if result.worst_module and result.worst_module[1] < 0.9999 else ""
    click.echo(f"energy kept: {100 * result.energy_kept:.2f}%{worst}")
    if result.logits:
        v = result.logits
        click.echo(f"logit change: max {v['max_abs_diff']:.3g} (largest logit "
                   f"{v['max_abs_logit']:.3g}) over {v['tokens']} tokens")


@cli.command("dequantize")
@click.argument("variant")
@click.option("--out", type=click.Path(path_type=Path), default=None)
@click.option("--name", default=None, help="Registry name (default BASE-nf4-dequantized).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None)
@click.option("--force", is_flag=True)
def dequantize_cmd(variant, out, name, dtype, force) -> None:
    """Write a base's NF4 variant (BASE@nf4) back as 16-bit weights."""
    from zoo.merge import dequantize

    _report_merge(dequantize(variant, out=out, name=name, dtype=dtype, force=force, log=_log))


def _report_merge(result) -> None:
    where = f"registered as {result.entry.name}" if result.entry else "written"
    click.echo(f"{where}: {result.path} ({result.tensors['total_size'] / 1e6:.1f} MB)")
    if result.verification:
        from zoo.merge import verification_line

        click.echo(verification_line(result.verification))
