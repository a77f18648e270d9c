"""`optcli compare`: the flags, and the two tables in the terminal. The work is optcli.compare's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from optcli.bench.workload_flags import WorkloadFlags
from optcli.cli.app import app
from optcli.cli.common import emit_json, err, fail, guard, out, print_table
from optcli.cli.flags import with_options
from optcli.compare.options import CompareOptions
from optcli.config import EngineConfig
from optcli.errors import KpiFailed, UsageError


@app.command()
@with_options(options=CompareOptions, workload=WorkloadFlags, config=EngineConfig)
def compare(
    options: CompareOptions,
    workload: WorkloadFlags,
    config: EngineConfig,
    model: Annotated[str | None, typer.Argument(help="Source model (HF directory, hub id or builtin:tiny-llama).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Quantize each recipe, measure all against the source, pick the one to ship; or the optimizations table."""
    o = options
    report, gate_failure, cleared = None, None, None
    with guard(as_json):
        if o.clear_cache:
            cleared = _clear(o.cache_dir)
        if model is not None or not o.clear_cache:
            if model is None:
                raise UsageError("missing MODEL (the source model to compare recipes on)")
            if o.optimizations == bool(o.recipes):
                raise UsageError("give --recipes R1,R2,... (the methods table) or --optimizations (the serving table)")
            if o.recipe is not None and not o.optimizations:
                raise UsageError("--recipe is the quantization row of --optimizations; the methods table takes --recipes")
            load, _ = workload.build()
            if load.sweep_size:
                raise UsageError("--rate sweep is profile's capacity plan; compare measures one load level")
            step = _step(as_json)
            if o.optimizations:
                from optcli.compare.optimizations_run import compare_optimizations

                report = compare_optimizations(model, load, config, o.recipe, o.out, o.cache_dir, o.calibration, load.seed,
                                               kv_cache_dtype=config.kv_cache_dtype, step=step)
            else:
                from optcli.compare.run import CompareRequest
                from optcli.compare.run import compare as run_compare

                req = CompareRequest(model, _names(o.recipes), load, config, o.kpi, o.objective, o.out, o.eval_text,
                                     o.gpu_hour_cost, _names(o.tasks) or None, o.tasks_path, o.limit, o.num_fewshot, o.cache_dir,
                                     o.calibration, load.seed)
                try:
                    report = run_compare(req, step)
                except KpiFailed as exc:  # the report is complete and written: show it, then exit 3
                    report, gate_failure = exc.report, exc
    if report is None:  # --clear-cache alone
        if as_json:
            emit_json(cleared)
        return
    _show(report, as_json, o.out)
    if gate_failure is not None:
        fail(str(gate_failure), 3)


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _clear(cache_dir: Path | None) -> dict:
    from optcli.compare import cache

    root = cache_dir or cache.default_cache_dir()
    removed = cache.clear(root)
    err.print(f"removed {len(removed)} cached artifact(s) from {root}", highlight=False)
    return {"cache_dir": str(root), "removed": [str(p) for p in removed]}


def _step(as_json: bool):
    show = not as_json and err.is_terminal

    def step(message: str) -> None:
        if show:
            err.print(f"[dim]· {escape(message)}[/dim]")

    return step


def _show(report: dict, as_json: bool, out_dir: Path | None) -> None:
    if as_json:
        emit_json(report)
        return
    if report.get("kind") == "optimizations":
        from optcli.compare.optimizations import optimization_cells

        headers, rows = optimization_cells(report)
        title = f"optcli compare --optimizations · {report['model']}"
    else:
        from optcli.compare.render import method_cells

        headers, rows = method_cells(report)
        title = f"optcli compare · {report['model']}"
    keep = [i for i in range(len(headers)) if i == 0 or any(row[i] != "n/a" for row in rows)]  # no empty columns
    headers, rows = [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 or header in ("best for", "switched off", "workload") else "right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    print_table(table)
    if report.get("kind") != "optimizations":
        out.print(f"best by {report['objective']}: {report['best'] or 'none'}"
                  + (f" -> {report['best_artifact']}" if report.get("best_artifact") else ""), highlight=False)
        from optcli.compare.render import method_notes

        for note in method_notes(report):
            out.print(f"[dim]{escape(note)}[/dim]", highlight=False, soft_wrap=True)
        cache = report["cache"]
        out.print(f"artifact cache {cache['dir']}: reused {len(cache['reused'])}, quantized {len(cache['quantized'])}",
                  highlight=False)
        for recipe, warning in (report.get("contention") or {}).items():
            err.print(f"[yellow]warning ({escape(recipe)}): {escape(warning)}[/yellow]", highlight=False, soft_wrap=True)
    if out_dir is not None:
        out.print(f"reports: {out_dir}/report.json, report.md, report.html", highlight=False)
