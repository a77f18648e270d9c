"""`optcli profile`: the flags, and the terminal summary of a report (the source side by side with the artifact)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from optcli.bench.args import AccuracyArgs, OutputArgs, ProfileArgs, TargetArgs
from optcli.bench.workload_flags import WorkloadFlags
from optcli.cli.app import app
from optcli.cli.common import emit_json, err, fail, guard, mib, out, print_table
from optcli.cli.flags import with_options
from optcli.cli.profile_blame import check_per_layer, run_per_layer
from optcli.config import EngineConfig
from optcli.errors import KpiFailed
from optcli.report.markdown import (
    comparison_caption,
    comparison_table,
    comparison_warnings,
    contention_warning,
    head_line,
    kpi_value,
    roofline_line,
    throughput_notes,
)
from optcli.schema.report import ProfileReport


@app.command()
@with_options(workload=WorkloadFlags, accuracy=AccuracyArgs, target=TargetArgs, outputs=OutputArgs,
              config=EngineConfig)
def profile(
    model: Annotated[str, typer.Argument(help="Model or artifact to profile (or the served model name with --endpoint).")],
    workload: WorkloadFlags,
    accuracy: AccuracyArgs,
    target: TargetArgs,
    outputs: OutputArgs,
    config: EngineConfig,
    config_given: dict,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Also rank the artifact's layers by the KLD each "
                                            "causes alone (per_layer.json): which layers the accuracy loss comes from.")] = False,
) -> None:
    """Measure accuracy, throughput, latency under load and cost; gate on KPIs."""
    from optcli.bench.profile import profile as run_profile  # torch, transformers: only when profiling

    report, gate_failure = None, None
    with guard(as_json):
        load, dataset = workload.build()
        target = replace(target, max_model_len=config_given["max_model_len"])  # vLLM's own unless given
        args = ProfileArgs(model, load, accuracy, target, outputs, config, dataset_path=dataset)
        blame_against = check_per_layer(model, accuracy.baseline, target.endpoint) if per_layer else None
        note = _Steps(not as_json and err.is_terminal)
        try:
            report = run_profile(args, note)
        except KpiFailed as exc:  # the report is complete and written: show it, then exit 3
            report, gate_failure = exc.report, exc
        finally:
            note.close()
        if blame_against is not None:  # after the report, so a failed blame never costs the profile
            run_per_layer(model, blame_against, accuracy.eval_text, outputs.out, as_json)
    _show_profile(report, as_json, outputs.out)
    if gate_failure is not None:
        fail(str(gate_failure), 3)


class _Steps:
    """What a person at a terminal sees while profile works: a dim line per step and, while requests are out to
    a server, one live line under it (answered, in flight, the longest wait against the timeout), redrawn from
    the load's own event loop twice a second (no refresh thread to compete with its time stamps). Nothing in
    pipes or with --json."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self._live = None

    def __call__(self, message: str) -> None:
        self.close()
        if self.show:
            err.print(f"[dim]· {message}[/dim]")

    def load(self, state: dict) -> None:
        if not self.show:
            return
        if self._live is None:
            from rich.live import Live

            self._live = Live(console=err, auto_refresh=False, transient=True)
            self._live.start()
        line = f"  {state['done']}/{state['total']} answered, {state['in_flight']} in flight"
        if state["failed"]:
            line += f", {state['failed']} failed"
        if state["oldest_s"] is not None and state["oldest_s"] >= 2:
            line += f"; waiting {state['oldest_s']:.0f} s (request timeout {state['timeout_s']:g} s)"
        self._live.update(Text(line, style="dim"), refresh=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _fmt(value, spec=".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def _summary(report: ProfileReport) -> Table:
    """The headline figures, one row each (the full report is report.md / report.json)."""
    table = Table(title=f"optcli profile · {report.model}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    tp, acc, mem = report.throughput, report.accuracy, report.memory
    engine = report.workload.engine
    if engine is not None and engine.dtype is not None:  # a vLLM server's dtype is its own
        base = engine.baseline_dtype
        dtype = engine.dtype + (f" (baseline {base})" if base not in (None, engine.dtype) else "")
        table.add_row("device / dtype", f"{engine.device} / {dtype}")
    table.add_row("output tok/s (offline)", _fmt(tp.output_tok_s, ".1f"))
    table.add_row("requests/s", _fmt(tp.requests_s, ".2f"))
    for metric in ("ttft", "tpot", "itl", "e2e"):
        lat = report.latency_ms.get(metric)
        table.add_row(f"{metric} p50 / p99 (ms)", f"{_fmt(lat.p50, '.1f')} / {_fmt(lat.p99, '.1f')}")
    table.add_row("ppl (baseline)", f"{_fmt(acc.ppl, '.3f')} ({_fmt(acc.baseline_ppl, '.3f')})")
    table.add_row("KLD mean / top-1", f"{_fmt(acc.kld_mean, '.4f')} / {_fmt(acc.top1_agreement, '.3f')}")
    for row in acc.tasks or []:
        table.add_row(f"{row.task} {row.metric} (baseline, recovery)",
                      f"{_fmt(row.candidate, '.4f')} ({_fmt(row.baseline, '.4f')}, {_fmt(row.recovery, '.3f')})")
    table.add_row("weights / peak / KV cache", " / ".join(mib(n) for n in (mem.weights_bytes, mem.peak_bytes,
                                                                             mem.kv_cache_bytes)))
    table.add_row("batch efficiency", _fmt(report.batch_efficiency, ".2f"))
    if tp.prefix_cache_hit_rate is not None:
        table.add_row("prefix cache hit rate (online)", _fmt(tp.prefix_cache_hit_rate, ".3f"))
    table.add_row("USD per 1K tokens (prompt + generated)", _fmt(report.cost.usd_per_1k_tokens, ".5f"))
    table.add_row("USD per 1K output tokens", _fmt(report.cost.usd_per_1k_output_tokens, ".5f"))
    return table


def _show_profile(report: ProfileReport, as_json: bool, out_dir: Path | None) -> None:
    if as_json:
        emit_json(report.to_dict())
        return
    print_table(_summary(report))
    comparison = comparison_table(report)  # the source measured the same way in this run: ratios are the point
    if comparison is not None:
        title, headers, rows = comparison
        side = Table(title="source vs artifact", caption=comparison_caption(report))
        for i, header in enumerate(headers):
            side.add_column(header, justify="left" if i == 0 else "right")
        for row in rows:
            side.add_row(*(escape(cell) for cell in row))
        print_table(side)
    _show_notes(report)
    for check in report.kpi.checks or []:
        style = "green" if check.passed else "red"
        base = "" if check.baseline is None else f", baseline {_fmt(check.baseline)}"
        value = kpi_value(check) if check.ci_low is not None else _fmt(check.value)
        out.print(f"[{style}]{'PASS' if check.passed else 'FAIL'}[/{style}] {escape(check.name)} (value {escape(value)}{base})")
    for item in report.kpi.production_only or []:
        out.print(f"KPI {escape(item['key'])}: recorded, not applied (production-only: {escape(item['why'])})",
                  highlight=False, soft_wrap=True)
    if out_dir is not None:
        out.print(f"reports: {out_dir}/report.json, report.md, report.html")


def _show_notes(report: ProfileReport) -> None:
    """Warnings on stderr (a busy machine first: every figure was taken on it), then the one-line findings."""
    busy = contention_warning(report)
    for line, kind in ([(busy, "warning")] if busy else []) + [(w, "warning") for w in comparison_warnings(report)] \
            + [(n, "note") for n in throughput_notes(report)]:
        err.print(f"[yellow]{kind}: {escape(line)}[/yellow]", highlight=False, soft_wrap=True)
    for line in (roofline_line(report), head_line(report)):
        if line is not None:
            out.print(escape(line), highlight=False, soft_wrap=True)
    failures = report.throughput.failures
    if failures is not None and failures.failed:
        why = "; ".join(f"{r['count']}x {r['error']}" for r in (failures.reasons or [])[:3])
        err.print(f"[yellow]{failures.failed} of {failures.total} requests failed:[/yellow] {why}", highlight=False)
