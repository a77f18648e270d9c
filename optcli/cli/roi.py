"""`optcli roi`: cost, savings, payback and capacity from a profile report or an estimate (rendering in optcli.roi.render)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optcli.cli.app import app
from optcli.cli.common import emit_json, err, guard, out
from optcli.cli.flags import with_options
from optcli.errors import UsageError
from optcli.roi.analysis import RoiOptions


@app.command()
@with_options(options=RoiOptions)
def roi(
    options: RoiOptions,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG of replicas and load over the trace.")] = None,
    autoscale: Annotated[str | None, typer.Option("--autoscale", help="keda or hpa: write an autoscaler from the report's sweep (with --out).")] = None,
    scaler_out: Annotated[Path | None, typer.Option("--out", help="With --autoscale: the YAML file to write.")] = None,
    serving_engine: Annotated[str | None, typer.Option("--serving-engine", help="With --autoscale: whose metrics the scaler reads, builtin or vllm (default: the report's engine).")] = None,
    prometheus_url: Annotated[str, typer.Option("--prometheus-url", help="With --autoscale keda: the Prometheus KEDA queries.")] = "http://prometheus.monitoring.svc:9090",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Cost per 1K tokens, savings, payback, replicas and autoscaling from a profile report or an estimate."""
    from optcli.roi.analysis import compute_roi

    with guard(as_json):
        if plot is not None and options.load_trace is None:
            raise UsageError("--plot needs --load-trace")
        if autoscale is not None or scaler_out is not None or serving_engine is not None:
            from optcli.cli.roi_autoscale import check_autoscale

            check_autoscale(autoscale, scaler_out, options.report, serving_engine)
        if plot is not None:
            from optcli.roi.capacity import check_plot_path

            check_plot_path(plot)  # before the table: a plot that cannot be written is exit 2 with nothing printed
        result = compute_roi(options)
        if autoscale is not None:
            from optcli.cli.roi_autoscale import write_autoscaler

            result["autoscale"] = write_autoscaler(autoscale, scaler_out, options.report, result, options,
                                                   serving_engine, prometheus_url)
        if plot is not None:
            from optcli.roi.capacity import plot as plot_replay

            plot_replay(result["capacity"]["autoscaling"]["rows"], plot)
    if as_json:
        emit_json(result)
        return
    from optcli.roi.render import render_roi, render_warnings

    render_roi(result, out, plot)
    if autoscale is not None:
        from optcli.cli.roi_autoscale import print_autoscaler

        print_autoscaler(result["autoscale"], out)
    render_warnings(result, err)
