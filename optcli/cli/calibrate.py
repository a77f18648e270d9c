"""`optcli calibrate`: build a hashed calibration set; with --stats, the activation-outlier table; with
--sensitivity, the per-layer KLD ranking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from optcli.cli.app import app
from optcli.cli.common import emit_json, err, guard, out


@app.command()
def calibrate(
    model: Annotated[str, typer.Option("--model", help="Model whose tokenizer the set is built with.")],
    source: Annotated[str, typer.Option("--source", help="A .txt/.jsonl/.json/.parquet/.csv file, a directory, "
                                        "a save_to_disk directory, hf:NAME[:CONFIG][:SPLIT], builtin, or self.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Calibration set directory to create.")],
    samples: Annotated[int, typer.Option("--samples", min=1, help="Windows to pick.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="Tokens per window.")] = 512,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    text_field: Annotated[str | None, typer.Option("--text-field", help="Row field holding the text (default: text).")] = None,
    chat_template: Annotated[bool, typer.Option("--chat-template", help="Render OpenAI-style 'messages' rows with the model's chat template.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 2 when the source has fewer windows than --samples.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Activation-outlier report per linear layer (stats.json) and a recipe suggestion.")] = False,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Per-layer KLD of quantizing each layer alone "
                                              "at W4A16 (sensitivity.json, sensitivity.png): what auto:BITS spends by.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as one JSON object.")] = False,
) -> None:
    """Build a reusable, hashed calibration set; with --stats, report activation outliers."""
    from optcli.calibration.dataset import calibrate as run_calibrate

    with guard(as_json):
        calib, report = run_calibrate(model, source, out_dir, samples, seq_len, seed, text_field=text_field,
                                      chat_template=chat_template, strict=strict, stats=stats, force=force,
                                      sensitivity=sensitivity)
    sens = json.loads((out_dir / "sensitivity.json").read_text()) if sensitivity else None
    manifest = calib.manifest
    for warning in manifest["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    if as_json:
        result = {"out": str(out_dir), **manifest}
        if report is not None:
            result["stats"] = {"file": str(out_dir / "stats.json"), "suggestion": report["suggestion"],
                               "worst": [{"layer": n, **report["layers"][n]} for n in report["worst"][:5]]}
        if sens is not None:
            result["sensitivity"] = sensitivity_summary(sens, out_dir)
        emit_json(result)
        return
    show_calibration(manifest, out_dir)
    if report is not None:
        show_outliers(report, out_dir)
    if sens is not None:
        show_sensitivity(sens, out_dir)


def sensitivity_summary(sens: dict, out_dir: Path, rows: int = 5) -> dict:
    keep = ("layer", "kld", "share", "rank")
    return {"file": str(out_dir / "sensitivity.json"), "plot": str(out_dir / "sensitivity.png"),
            "scheme": sens["scheme"], "tokens": sens["tokens"], "total_kld_alone": sens["total_kld_alone"],
            "joint_kld": sens["joint_kld"], "top": [{k: r[k] for k in keep} for r in sens["layers"][:rows]]}


def show_sensitivity(sens: dict, out_dir: Path, rows: int = 15) -> None:
    """Ranked: the layers whose quantization alone costs the most KLD, with their share of the sum."""
    layers = sens["layers"]
    table = Table(title=f"per-layer sensitivity · {sens['scheme']} one layer at a time · top {min(rows, len(layers))} "
                  f"of {len(layers)} ({sens['tokens']} tokens)")
    table.add_column("#", justify="right")
    table.add_column("layer", no_wrap=True)
    table.add_column("KLD alone", justify="right")
    table.add_column("share", justify="right")
    table.add_column("cumulative", justify="right")
    cumulative = 0.0
    for row in layers[:rows]:
        cumulative += row["share"]
        table.add_row(str(row["rank"]), row["layer"], f"{row['kld']:.3g}", f"{row['share']:.1%}", f"{cumulative:.0%}")
    out.print(table)
    out.print(f"sum of the parts {sens['total_kld_alone']:.4g} nats · all layers at once {sens['joint_kld']:.4g} · "
              f"{out_dir / 'sensitivity.json'} · {out_dir / 'sensitivity.png'}", soft_wrap=True)


def show_calibration(manifest: dict, out_dir: Path) -> None:
    table = Table(title="optcli calibrate", show_header=False)
    table.add_row("source", manifest["source"])
    dropped = manifest["documents_dropped"]
    reasons = ", ".join(f"{n} {r}" for r, n in dropped.items())
    table.add_row("documents", f"{manifest['documents_read']} read · {manifest['documents_used']} used · "
                  f"{sum(dropped.values())} dropped" + (f" ({reasons})" if reasons else ""))
    ts = manifest["token_stats"]
    table.add_row("document tokens", f"min {ts['min']} · median {ts['median']} · mean {ts['mean']} · max {ts['max']} "
                  f"· total {ts['total']}")
    peak = max(b["count"] for b in ts["histogram"]) or 1
    for b in ts["histogram"]:
        if b["count"]:
            table.add_row(f"  {b['min']}–{b['max']} tokens", f"{'█' * max(1, round(24 * b['count'] / peak))} {b['count']}")
    table.add_row("samples", f"{manifest['samples']} × {manifest['seq_len']} tokens (asked {manifest['samples_requested']}, "
                  f"seed {manifest['seed']})")
    table.add_row("sha256", manifest["sha256"])
    table.add_row("written", str(out_dir))
    out.print(table)


def show_outliers(report: dict, out_dir: Path, rows: int = 10) -> None:
    table = Table(title=f"activation outliers · worst {min(rows, len(report['worst']))} of {len(report['layers'])} "
                  f"linear layers ({report['tokens']} tokens)")
    table.add_column("layer", no_wrap=True)
    for col in ("input absmax", "median channel", "outlier ratio", "weight range"):
        table.add_column(col, justify="right")
    for name in report["worst"][:rows]:
        s = report["layers"][name]
        ratio = "n/a" if s["outlier_ratio"] is None else f"{s['outlier_ratio']:.1f}×"
        table.add_row(name, f"{s['input_absmax']:.3g}", f"{s['input_channel_median']:.3g}", ratio,
                      f"{s['weight_min']:.3g}..{s['weight_max']:.3g}")
    out.print(table)
    suggestion = report["suggestion"]
    alt = f" (or {', '.join(suggestion['alternatives'])})" if suggestion["alternatives"] else ""
    out.print(f"suggested recipe: [bold]{suggestion['recipe']}[/bold]{alt} — {suggestion['reason']}", soft_wrap=True)
    out.print(f"all layers: {out_dir / 'stats.json'}")
