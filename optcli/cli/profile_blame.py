"""`optcli profile --per-layer`: the blame table (bench/blame.py) in the terminal and per_layer.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.table import Table

from optcli.cli.common import err, out

BLAME_FILE = "per_layer.json"


def check_per_layer(model: str, baseline: str | None, endpoint: str | None) -> str:
    """Before any work: the baseline to blame against (exit 2 when there is none, or for an endpoint)."""
    from optcli.bench.blame import blame_baseline
    from optcli.errors import UsageError

    if endpoint:
        raise UsageError("--per-layer swaps weights layer by layer: it needs a local MODEL, not --endpoint")
    return blame_baseline(model, baseline)


def run_per_layer(model: str, baseline: str, eval_text: Path | None, out_dir: Path | None, quiet: bool) -> dict:
    from optcli.bench.blame import per_layer_blame

    blame = per_layer_blame(model, baseline, eval_text)
    if out_dir is not None and out_dir.is_dir():  # beside report.json, replaced whole (never half-written)
        tmp = out_dir / f".{BLAME_FILE}.tmp"
        tmp.write_text(json.dumps(blame, indent=2))
        os.replace(tmp, out_dir / BLAME_FILE)
    show_blame(blame, quiet)
    return blame


def show_blame(blame: dict, quiet: bool, rows: int = 15) -> None:
    """Most blamed first; with --json the table goes to stderr so stdout stays one JSON object."""
    console = err if quiet else out
    table = Table(title=f"per-layer blame · each changed layer alone vs {blame['baseline']} ({blame['tokens']} tokens)")
    for col, justify in (("#", "right"), ("layer", "left"), ("KLD alone", "right"), ("share", "right"),
                         ("cumulative", "right")):
        table.add_column(col, justify=justify, no_wrap=col == "layer")
    cumulative = 0.0
    for row in blame["layers"][:rows]:
        cumulative += row["share"]
        table.add_row(str(row["rank"]), row["layer"], f"{row['kld']:.3g}", f"{row['share']:.1%}", f"{cumulative:.0%}")
    console.print(table)
    console.print(f"{blame['layers_changed']} layers changed · sum of the parts {blame['total_kld_alone']:.4g} nats · "
                  f"all at once {blame['joint_kld']:.4g}", soft_wrap=True)
