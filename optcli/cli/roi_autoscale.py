"""`roi --autoscale keda|hpa --out FILE`: the checks before any work, the write, and the why of each number."""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape

from optcli.errors import UsageError


def check_autoscale(kind: str | None, out: Path | None, report: Path | None, engine: str | None) -> None:
    from optcli.kpi.files import check_generated_out
    from optcli.roi.autoscale import HEADER

    if kind is None:
        raise UsageError("--out and --serving-engine go with --autoscale keda|hpa")
    if kind not in ("keda", "hpa"):
        raise UsageError(f"--autoscale must be keda or hpa (got '{kind}')")
    if out is None:
        raise UsageError("--autoscale needs --out FILE (the scaler YAML)")
    if report is None:
        raise UsageError("--autoscale sizes the scaler from a measured sweep: pass --report (profile --rate sweep)")
    if engine is not None and engine not in ("builtin", "vllm"):
        raise UsageError(f"--serving-engine must be builtin or vllm (got '{engine}')")
    check_generated_out(out, "--out", "a scaler file optcli wrote", HEADER)


def write_autoscaler(kind: str, out: Path, report_path: Path, result: dict, options, engine: str | None,
                     prometheus_url: str) -> dict:
    from optcli.kpi.files import write_generated
    from optcli.roi.autoscale import plan_scaler, render

    report = json.loads(Path(report_path).read_text(encoding="utf-8"))  # compute_roi read it already: it parses
    plan = plan_scaler(kind, report, result.get("capacity"), options.p95_slo_ms, options.min_replicas,
                       options.max_replicas, engine, prometheus_url)
    write_generated(out, render(plan), "--out")
    return {"kind": kind, "path": str(out), "threshold": plan.threshold, "min_replicas": plan.min_replicas,
            "max_replicas": plan.max_replicas, "query": plan.query, "why": plan.why}


def print_autoscaler(scaler: dict, out) -> None:
    out.print(f"autoscaler ({scaler['kind']}): {escape(scaler['path'])}", highlight=False)
    for key, why in scaler["why"].items():
        out.print(f"  {key}: {escape(why)}", highlight=False, soft_wrap=True)
