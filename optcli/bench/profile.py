"""`optcli profile`: accuracy against a baseline, offline throughput, online latency under load, the
machine it ran on, cost, and KPI gates, in one report (report.json / .md / .html).

A short orchestrator: `ProfileArgs` checked once (exit 2 before any model loads), one `Target` (the built-in
engine, an endpoint, or vLLM servers: `targets/`) measures, `report_build.py` fills the `ProfileReport`.
All figures are measured in this run; what cannot be measured here is None, never estimated.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

from optcli.bench.args import Checked, ProfileArgs
from optcli.bench.comparison import offline_online_notes, roofline
from optcli.bench.contention import ContentionMonitor
from optcli.bench.export import level_rows, write_export
from optcli.bench.kpi import latency_gates, slo_from_kpi
from optcli.bench.kpi_scope import evaluate_with_scope
from optcli.bench.report_build import add_accuracy, add_baseline, add_speed, new_report
from optcli.bench.targets import Measured, Target, make_target
from optcli.engine.loading.placement import resolve_device
from optcli.errors import KpiFailed, UsageError
from optcli.report import write_reports
from optcli.roi.hardware import GpuUtilizationSampler, describe, peak_bandwidth
from optcli.schema.report import ProfileReport

# how each target's accuracy was measured, when not `--accuracy-backend`'s (report.workload.accuracy_backend)
SERVED_BACKEND = {"endpoint": "endpoint top-{top_k} log-probs", "vllm": "vLLM endpoint top-{top_k} log-probs"}


def profile(args: ProfileArgs, progress=None) -> ProfileReport:
    """Run the whole profile and write the reports; raises KpiFailed (exit 3) after writing them."""
    args = replace(args, target=args.target.with_env())
    checked = args.check()
    args = replace(args, config=args.config.with_options(device=resolve_device(args.config.device)))
    step = progress or (lambda message: None)
    target, baseline, manifest = make_target(args)
    _check_relative_gates(checked, target, args)
    report = new_report(args, target, baseline, manifest, describe(args.config.device))
    _accuracy(report, args, target, checked, step)
    gates = latency_gates(checked.kpi)
    measured = _measure(report, args, target, slo_from_kpi(checked.kpi) if checked.kpi else None, step)
    points = add_speed(report, measured, gates, target.in_process)
    baseline_figures = add_baseline(report, measured, args.workload, args.config.device)
    if measured.candidate is not None:  # offline is every request at once: below online it needs a reason
        report.throughput.notes = offline_online_notes(report, measured.candidate, measured.baseline, args.workload)
    if target.in_process:
        # after both models ran: on a CPU the 1 GiB pass would otherwise sit in their peak RSS
        step("peak memory bandwidth")
        report.roofline = roofline(peak_bandwidth(args.config.device), report, baseline_figures)
    if checked.kpi is not None:  # + the alert_window's windows and the production-only keys
        report.kpi = evaluate_with_scope(report, checked.kpi, measured.levels[-1][1])
    _write(report, args, measured, points, baseline_figures)
    if not report.kpi.passed:
        failed = [c.name for c in report.kpi.checks if not c.passed]
        raise KpiFailed(f"KPI gate failed: {', '.join(failed)}", report)
    return report


def _check_relative_gates(checked: Checked, target: Target, args: ProfileArgs) -> None:
    kpi = checked.kpi
    if kpi is not None and kpi.relative_gates() and not target.has_baseline:
        why = ("an --endpoint run measures no baseline" if args.target.endpoint else
               "pass --baseline MODEL (an artifact's default baseline is its source)")
        raise UsageError(f"KPI gate(s) {', '.join(kpi.relative_gates())} compare with a baseline measured in the "
                         f"same run, and there is none: {why}")


def _accuracy(report: ProfileReport, args: ProfileArgs, target: Target, checked: Checked, step) -> None:
    backend = SERVED_BACKEND["endpoint"] if args.target.endpoint else None
    add_accuracy(report, target.accuracy(args.accuracy.eval_text, step), backend)
    if checked.tasks is not None:  # the built-in engine only (ProfileArgs.check)
        report.accuracy.tasks = target.tasks(checked.tasks, step)
        acc = args.accuracy
        report.workload.tasks = {"names": acc.task_names, "tasks_path": str(acc.tasks_path) if acc.tasks_path else None,
                                 "limit": acc.limit, "num_fewshot": acc.num_fewshot}


def _measure(report: ProfileReport, args: ProfileArgs, target: Target, slo: dict | None, step) -> Measured:
    """The speed runs, with the GPU's utilization sampled and other processes' CPU watched; not with
    --endpoint, where a server on this machine would count as another process."""
    monitor = ContentionMonitor(with_baseline=target.has_baseline) if not args.target.endpoint else None
    with GpuUtilizationSampler() as gpu, monitor or contextlib.nullcontext():
        measured = target.measure(args.workload, slo, step)
    report.hardware.contention = monitor.result() if monitor is not None else None
    report.gpu_utilization = gpu.mean()
    if measured.accuracy is not None:  # vLLM: scored while its servers were up
        add_accuracy(report, measured.accuracy, SERVED_BACKEND["vllm"])
    return measured


def _write(report: ProfileReport, args: ProfileArgs, measured: Measured, points: list, baseline: dict | None) -> None:
    """--export's rows (every online request) and the three reports."""
    model, workload = args.model, args.workload
    samples = {"candidate": measured.online["samples"]}
    per_request = [row for level, summary in measured.levels for row in level_rows(summary, model, "candidate", level)]
    if measured.baseline_online is not None:
        samples["baseline"] = measured.baseline.samples if measured.baseline else measured.baseline_online["samples"]
        per_request += level_rows(measured.baseline_online, report.baseline, "baseline", workload.headline())
    if args.outputs.export is not None:
        write_export(Path(args.outputs.export), per_request)
        report.workload.export = {"path": str(args.outputs.export), "rows": len(per_request)}
    if args.outputs.out is not None:
        sweep = [p.to_dict() for p in points] if len(points) > 1 else None
        write_reports(report, Path(args.outputs.out), samples=samples, sweep=sweep,
                      baseline_report=baseline)
