"""`serve --kpi FILE` and its companions, checked before the model loads: the file (validated as `profile`
validates it), the inputs its gates need (a baseline report, a GPU-hour price, a monthly budget), and the
eval text the accuracy probe scores."""

from __future__ import annotations

import json
from pathlib import Path

from optcli.errors import UsageError


def read_eval_text(path: Path | None) -> str:
    from optcli.calibration.corpus import heldout_text

    if path is None:
        return heldout_text()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--eval-text {path}: not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"--eval-text {path}: cannot read ({e.strerror or e})") from None
    if not text.strip():
        raise UsageError(f"--eval-text {path}: no text to score (empty or only whitespace)")
    return text


def _read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--baseline-report {path}: cannot read a profile report.json ({e})") from None
    tp = report.get("throughput") if isinstance(report, dict) else None
    if not isinstance(tp, dict) or not (tp.get("online_output_tok_s") or tp.get("output_tok_s")):
        raise UsageError(f"--baseline-report {path}: no throughput.online_output_tok_s or output_tok_s "
                         "(is it an optcli profile report.json?)")
    return report


def baseline_tok_s(path: Path) -> float:
    """A profile report's served output tok/s (the headline online level), else its offline figure."""
    tp = _read_report(path)["throughput"]
    return tp.get("online_output_tok_s") or tp["output_tok_s"]


def kpi_options(kpi_file: Path | None, baseline_report: Path | None, gpu_hour_cost: float | None,
                monthly_budget: float | None, eval_text: Path | None, engine: str):
    """The serve app's KpiOptions, or None without --kpi; every problem is a UsageError (exit 2)."""
    if kpi_file is None:
        given = [n for n, v in (("--baseline-report", baseline_report), ("--gpu-hour-cost", gpu_hour_cost),
                                ("--monthly-budget", monthly_budget), ("--eval-text", eval_text)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only mean something with --kpi FILE")
        return None
    if engine != "builtin":
        raise UsageError("--kpi watches the builtin engine; for vLLM, `optcli kpi rules FILE --engine vllm` "
                         "writes the same KPIs as Prometheus alerts over vLLM's metrics")
    from optcli.bench.kpi import load_kpi
    from optcli.kpi.live import from_kpi
    from optcli.serve.kpi_monitor import KpiOptions

    live = from_kpi(load_kpi(kpi_file))
    if gpu_hour_cost is not None and not gpu_hour_cost >= 0:
        raise UsageError("--gpu-hour-cost must be >= 0")
    if monthly_budget is not None and not monthly_budget > 0:
        raise UsageError("--monthly-budget must be > 0")
    for flag, value, why in (("--baseline-report", baseline_report, "compare(s) with a profile report"),
                             ("--gpu-hour-cost", gpu_hour_cost, "need(s) a GPU-hour price"),
                             ("--monthly-budget", monthly_budget, "need(s) a monthly budget (USD)")):
        keys = live.needs()[flag[2:].replace("-", "_")]
        if keys and value is None:
            raise UsageError(f"{kpi_file}: {', '.join(keys)} {why}: pass {flag}")
    report = _read_report(baseline_report) if baseline_report is not None else None
    return KpiOptions(live=live, eval_text=read_eval_text(eval_text), baseline_report=report,
                      gpu_hour_cost=gpu_hour_cost, monthly_budget=monthly_budget)
