"""`optcli quantize`: a model and a recipe in, an artifact directory and its summary table out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from optcli.cli.app import app
from optcli.cli.common import emit_json, guard, layer_progress, mib, out


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="HF directory, hub id, or builtin:tiny-llama.")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe name (optcli recipes list) or YAML path.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to create.")],
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Calibration set (optcli calibrate).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model's own code.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for calibration sampling.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Quantize MODEL with a recipe into an artifact directory."""
    if device == "cpu":  # llm-compressor onloads to any visible accelerator; hide them before torch loads
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from optcli.quantize.pipeline import quantize as run_quantize

    with guard(as_json), layer_progress(f"quantizing {model} · {recipe}", as_json) as progress:
        manifest = run_quantize(model, recipe, out_dir, calibration, device, force, trust_remote_code, seed, progress)
    summary = {
        "artifact": manifest["artifact"],
        "recipe": manifest["recipe"]["name"],
        "source": manifest["source"]["spec"],
        "device": manifest["device"],
        "duration_s": manifest["duration_s"],
        "size_bytes_before": manifest["size_bytes"]["before"],
        "size_bytes_after": manifest["size_bytes"]["after"],
        "peak_memory": manifest["memory"],
        "layers": count_decisions(manifest["layers"]),
    }
    allocation = manifest.get("allocation")
    if allocation is not None:  # auto:BITS
        summary["allocation"] = {k: allocation[k] for k in ("budget_bits", "bits_per_weight", "bits_per_weight_all",
                                                             "floor_bits", "layers_per_scheme", "recipe_file")}
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"optcli quantize · {summary['recipe']}", show_header=False)
    table.add_row("artifact", summary["artifact"])
    table.add_row("source", summary["source"])
    before, after = summary["size_bytes_before"], summary["size_bytes_after"]
    table.add_row("weights", f"{mib(before)} → {mib(after)} ({after / before:.0%})" if before else mib(after))
    table.add_row("duration", f"{summary['duration_s']:.1f} s on {summary['device']}")
    table.add_row("peak host memory", mib(summary["peak_memory"]["host_peak_rss_bytes"]))
    if allocation is not None:
        table.add_row("bits per weight", f"{allocation['bits_per_weight']:.3f} of {allocation['budget_bits']:g} "
                      f"(linear layers; {allocation['bits_per_weight_all']:.3f} with the embeddings)")
        table.add_row("recipe", str(Path(summary["artifact"]) / allocation["recipe_file"]))
    for decision, count in summary["layers"].items():
        table.add_row(f"layers: {decision}", str(count))
    out.print(table)


def count_decisions(layers: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in layers.values():
        key = str(layer.get("scheme", "?")).split(" (")[0]
        key = f"{layer['precision']} {key}" if "precision" in layer else key  # auto:BITS: the rung, then the layout
        counts[key] = counts.get(key, 0) + 1
    return counts
