"""`optcli roi`: cost, savings, payback and capacity from a profile report or an estimate (rendering in optcli.roi.render)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optcli.cli.app import app
from optcli.cli.common import emit_json, err, guard, out
from optcli.errors import UsageError


@app.command()
def roi(
    report: Annotated[Path | None, typer.Option("--report", help="report.json from optcli profile (measured).")] = None,
    estimate: Annotated[str | None, typer.Option("--estimate", help="MODEL (or config.json): roofline estimate instead of a report.")] = None,
    baseline_report: Annotated[Path | None, typer.Option("--baseline-report", help="report.json of what you run today.")] = None,
    baseline_usd_per_1k_tokens: Annotated[float | None, typer.Option("--baseline-usd-per-1k-tokens", help="Or today's API price per 1K tokens.")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU from the catalog (price, memory, bandwidth, FLOP/s).")] = None,
    gpu_hour_cost: Annotated[float | None, typer.Option("--gpu-hour-cost", help="USD per GPU hour (overrides report and catalog).")] = None,
    gpu_catalog: Annotated[Path | None, typer.Option("--gpu-catalog", help="YAML merged over the packaged GPU catalog.")] = None,
    requests_per_day: Annotated[float | None, typer.Option("--requests-per-day", help="Default 10,000.")] = None,
    tokens_per_request: Annotated[float | None, typer.Option("--tokens-per-request", help="Prompt + generated (default: the report's workload, else 1,000).")] = None,
    implementation_cost: Annotated[float | None, typer.Option("--implementation-cost", help="One-off USD, for the payback period (default 0).")] = None,
    target_rps: Annotated[float | None, typer.Option("--target-rps", help="Requests/s to plan replicas for.")] = None,
    p95_slo_ms: Annotated[float | None, typer.Option("--p95-slo-ms", help="p95 end-to-end latency SLO.")] = None,
    load_trace: Annotated[Path | None, typer.Option("--load-trace", help="CSV time,requests_per_s: replay autoscaling.")] = None,
    min_replicas: Annotated[int, typer.Option("--min-replicas")] = 1,
    max_replicas: Annotated[int, typer.Option("--max-replicas")] = 10,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG of replicas and load over the trace.")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Recipe for the memory plan/estimate (default: the report's, else bf16).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Concurrent sequences (estimate default 16).")] = None,
    context_len: Annotated[int | None, typer.Option("--context-len", help="Tokens per sequence for the memory plan (default 2048).")] = None,
    output_len: Annotated[int | None, typer.Option("--output-len", help="Generated tokens per request for --estimate (default 256).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="The dtype `serve --dtype` would get, for the KV cache in the plan (default: the report's, else auto).")] = None,
    autoscale: Annotated[str | None, typer.Option("--autoscale", help="keda or hpa: write an autoscaler from the report's sweep (with --out).")] = None,
    scaler_out: Annotated[Path | None, typer.Option("--out", help="With --autoscale: the YAML file to write.")] = None,
    serving_engine: Annotated[str | None, typer.Option("--serving-engine", help="With --autoscale: whose metrics the scaler reads, builtin or vllm (default: the report's engine).")] = None,
    prometheus_url: Annotated[str, typer.Option("--prometheus-url", help="With --autoscale keda: the Prometheus KEDA queries.")] = "http://prometheus.monitoring.svc:9090",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Cost per 1K tokens, savings, payback, replicas and autoscaling from a profile report or an estimate."""
    from optcli.roi.analysis import RoiOptions, compute_roi

    options = RoiOptions(report, baseline_report, baseline_usd_per_1k_tokens, gpu, gpu_hour_cost, gpu_catalog,
                         requests_per_day, tokens_per_request, implementation_cost, target_rps, p95_slo_ms,
                         load_trace, min_replicas, max_replicas, estimate, recipe, batch_size, context_len, output_len,
                         dtype=dtype)
    with guard(as_json):
        if plot is not None and load_trace is None:
            raise UsageError("--plot needs --load-trace")
        if autoscale is not None or scaler_out is not None or serving_engine is not None:
            from optcli.cli.roi_autoscale import check_autoscale

            check_autoscale(autoscale, scaler_out, report, serving_engine)
        if plot is not None:
            from optcli.roi.capacity import check_plot_path

            check_plot_path(plot)  # before the table: a plot that cannot be written is exit 2 with nothing printed
        result = compute_roi(options)
        if autoscale is not None:
            from optcli.cli.roi_autoscale import write_autoscaler

            result["autoscale"] = write_autoscaler(autoscale, scaler_out, report, result, options, serving_engine,
                                                   prometheus_url)
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
