"""`optcli kpi rules`: a KPI file as Prometheus recording and alerting rules (optcli.kpi.rules)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optcli.cli.app import app
from optcli.cli.common import err, guard, out
from optcli.errors import UsageError

kpi_app = typer.Typer(help="KPI files in production: Prometheus rules.", no_args_is_help=True)
app.add_typer(kpi_app, name="kpi")


@kpi_app.command("rules")
def rules(
    kpi_file: Annotated[Path, typer.Argument(help="KPI file (YAML), as profile --kpi and serve --kpi read it.")],
    out_path: Annotated[Path, typer.Option("--out", help="Rules file to write (Prometheus rule_files).")],
    engine: Annotated[str, typer.Option("--engine", help="Whose metric names: builtin (optcli serve) or vllm.")] = "builtin",
    baseline_report: Annotated[Path | None, typer.Option("--baseline-report", help="profile report.json: the throughput degradation_threshold and increase_threshold compare with.")] = None,
    gpu_hour_cost: Annotated[float | None, typer.Option("--gpu-hour-cost", help="USD per GPU hour (cost gates).")] = None,
    monthly_budget: Annotated[float | None, typer.Option("--monthly-budget", help="USD per month that cost.budget_alert is a share of.")] = None,
) -> None:
    """Write the KPI file's gates as Prometheus recording and alerting rules (for: = alert_window)."""
    from optcli.bench.kpi import load_kpi
    from optcli.cli.serve_kpi import baseline_tok_s
    from optcli.kpi.files import check_generated_out, write_generated
    from optcli.kpi.live import from_kpi
    from optcli.kpi.rules import ENGINES, HEADER, RulesInputs, render_rules

    with guard(False):
        if engine not in ENGINES:
            raise UsageError(f"--engine must be builtin or vllm (got '{engine}')")
        if gpu_hour_cost is not None and not gpu_hour_cost >= 0:
            raise UsageError("--gpu-hour-cost must be >= 0")
        if monthly_budget is not None and not monthly_budget > 0:
            raise UsageError("--monthly-budget must be > 0")
        live = from_kpi(load_kpi(kpi_file))
        check_generated_out(out_path, "--out", "a rules file optcli wrote", HEADER)
        inputs = RulesInputs(engine, baseline_tok_s(baseline_report) if baseline_report else None, gpu_hour_cost,
                             monthly_budget)
        text = render_rules(live, inputs, str(kpi_file))
        write_generated(out_path, text, "--out")
    for line in text.splitlines():
        if line.startswith("# not expressed: "):
            err.print(f"[yellow]note:[/yellow] {line[2:]}", highlight=False, soft_wrap=True)
    out.print(f"rules: {out_path} ({text.count('- alert: ')} alerts, {text.count('- record: ')} recording rules, "
              f"engine {engine})", highlight=False)
