"""Markdown summary of a profile report, compact enough to paste into a pull request.

The tables are built once here (`report_tables`) and reused by the HTML renderer so both show the
same figures. Anything null in the report is shown as "n/a": a report never invents numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optcli.schema.report import (
    Accuracy,
    ComparisonRow,
    Cost,
    KpiCheck,
    Latency,
    LoadPoint,
    Memory,
    Percentiles,
    ProfileReport,
    Section,
    Throughput,
)

NA = "n/a"
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
STATS = ("mean", "p50", "p95", "p99")
MEMORY_FIELDS = ("weights_bytes", "peak_bytes", "kv_cache_bytes")
ACCURACY_FIELDS = ("ppl", "baseline_ppl", "ppl_ratio", "kld_mean", "kld_p99", "top1_agreement")


def _stats(latency: Latency | None, metric: str) -> Percentiles:
    """One latency metric's percentiles, empty (all n/a) where the report has none."""
    return (latency.get(metric) if latency is not None else None) or Percentiles()


def fmt(value: Any) -> str:
    """A number for a table cell: thousands separators for big values, 4 significant digits otherwise."""
    if value is None:
        return NA
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN is as unmeasured as null
            return NA
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, Section):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={fmt(v) if not isinstance(v, str) else v}" for k, v in value.items()) or NA
    return str(value)


def _number(value: Any) -> float | None:
    return None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)


def _memory_unit(memory: Memory) -> tuple[str, float]:
    sizes = [_number(memory.get(k)) for k in MEMORY_FIELDS]
    biggest = max((s for s in sizes if s is not None), default=0.0)
    return ("GiB", 2.0**30) if biggest >= 2**30 else ("MiB", 2.0**20)


def _scaled(value: Any, scale: float) -> str:
    number = _number(value)
    return NA if number is None else f"{number / scale:,.2f}"


Table = tuple[str, list[str], list[list[str]]]  # (title, header cells, rows of cells)


def report_tables(report: ProfileReport | Mapping[str, Any]) -> list[Table]:
    """The report's sections as plain-text tables (title, headers with units, rows)."""
    report = ProfileReport.coerce(report)
    tp, memory = report.throughput or Throughput(), report.memory or Memory()
    acc, cost = report.accuracy or Accuracy(), report.cost or Cost()
    unit, scale = _memory_unit(memory)
    tables: list[Table] = [
        ("Throughput", ["output (tok/s)", "total (tok/s)", "requests (req/s)"],
         [[fmt(tp.output_tok_s), fmt(tp.total_tok_s), fmt(tp.requests_s)]]),
        ("Latency", ["metric", *(f"{s} (ms)" for s in STATS)],
         [[m, *(fmt(_stats(report.latency_ms, m).get(s)) for s in STATS)] for m in LATENCY_METRICS]),
        ("Memory", [f"weights ({unit})", f"peak ({unit})", f"KV cache ({unit})"],
         [[_scaled(memory.get(k), scale) for k in MEMORY_FIELDS]]),
        ("Accuracy", ["ppl", "baseline ppl", "ppl ratio", "KLD mean (nats)", "KLD p99 (nats)", "top-1 agreement"],
         [[fmt(acc.get(k)) for k in ACCURACY_FIELDS]]),
        ("Efficiency and cost", ["batch efficiency", "GPU utilization", "cost (USD / 1k tokens, prompt + generated)",
                                 "cost (USD / 1k output tokens)"],
         [[fmt(report.batch_efficiency), fmt(report.gpu_utilization), fmt(cost.usd_per_1k_tokens),
           fmt(cost.usd_per_1k_output_tokens)]]),
    ]
    if tp.sweep is not None and len(tp.sweep) > 1:
        tables.append(load_levels_table(report, tp.sweep))
    if acc.tasks:
        tables.append(("Tasks (lm-evaluation-harness)", ["task", "metric", "candidate", "baseline", "recovery"],
                       [[fmt(t.task), fmt(t.metric), fmt(t.candidate), fmt(t.baseline), fmt(t.recovery)]
                        for t in acc.tasks]))
    return tables


def load_levels_table(report: ProfileReport, levels: list[LoadPoint]) -> Table:
    """One row per load level (a sweep, rate or concurrency list): the curve saturation is read from."""
    best = report.throughput.slo_max_rate
    title = "Load levels" + (f" (SLO-max-rate: {fmt(best.requests_s)} req/s at {best.level})" if best else "")
    rows = []
    for p in levels:
        slo, failed = p.slo, p.requests.failed if p.requests else None
        met = slo.met if slo else None
        rows.append([fmt(p.label if p.label is not None else p.concurrency), fmt(p.achieved_rate_requests_s),
                     fmt(p.requests_s), fmt(p.output_tok_s),
                     *(fmt(_stats(p.latency_ms, m).get(s)) for m, s in (
                         ("ttft", "p50"), ("ttft", "p95"), ("tpot", "p50"), ("itl", "p95"), ("e2e", "p50"),
                         ("e2e", "p95"), ("e2e", "p99"))),
                     fmt(failed), NA if met is None else ("yes" if met else "no"),
                     fmt(slo.attainment if slo else None), fmt(slo.goodput_requests_s if slo else None)])
    headers = ["level", "achieved (req/s)", "completed (req/s)", "output (tok/s)", "TTFT p50 (ms)", "TTFT p95 (ms)",
               "TPOT p50 (ms)", "ITL p95 (ms)", "E2E p50 (ms)", "E2E p95 (ms)", "E2E p99 (ms)", "failed",
               "SLO met", "SLO attainment", "goodput (req/s)"]
    return (title, headers, rows)


# the comparison rows the summaries show (report.json's `comparison.rows` has every one), by `field`
SUMMARY_FIELDS = ("throughput.output_tok_s", "throughput.online_output_tok_s", "throughput.decode_tok_s",
                  "throughput.prompt_tok_s", "latency_ms.ttft.p50", "latency_ms.ttft.p95", "latency_ms.tpot.p50", "latency_ms.e2e.p95",
                  "memory.weights_bytes")


def fmt_ratio(value: Any) -> str:
    """0.42x, 1.35x; a third decimal where two would round a ratio off 1 onto it (0.996x, not 1.00x)."""
    number = _number(value)
    if number is None:
        return NA
    text = f"{number:.2f}"
    return f"{number:.3f}x" if text == "1.00" and number != 1 else f"{text}x"


def _bound(number: float) -> str:
    text = f"{number:.2f}"
    return f"{number:.3f}" if text == "1.00" and number != 1 else text


def fmt_interval(row: ComparisonRow | Mapping[str, Any]) -> str:
    """A comparison row's ratio with its 95% interval: "1.22x [1.18, 1.26]"; the ratio alone without one."""
    row = row if isinstance(row, ComparisonRow) else ComparisonRow.model_validate(row)
    ratio = fmt_ratio(row.ratio)
    low, high = _number(row.ci_low), _number(row.ci_high)
    if ratio == NA or low is None or high is None:
        return ratio
    return f"{ratio} [{_bound(low)}, {_bound(high)}]"


def _rows(report: ProfileReport) -> list[ComparisonRow] | None:
    return report.comparison.rows if report.comparison is not None else None


def comparison_caption(report: ProfileReport | Mapping[str, Any]) -> str | None:
    """How the comparison's figures were taken, under its table: repeats, order, the interval."""
    rows = _rows(ProfileReport.coerce(report))
    if rows is None:
        return None
    repeats = max((r.repeats or 0 for r in rows), default=0)
    if repeats >= 2:
        return (f"medians of {repeats} interleaved repeats (source and artifact alternating); ratio: the median of "
                "the repeats' artifact / source pairs [95% confidence interval]; a verdict needs the whole interval "
                "on one side of 1.00x")
    if repeats == 1:
        return "ratio = artifact / source; one repeat: no interval, so no verdict (--repeats 2 or more for one)"
    return "ratio = artifact / source"


def comparison_table(report: ProfileReport | Mapping[str, Any]) -> Table | None:
    """Source vs artifact, one row per summary figure with the artifact/source ratio, its 95% interval and
    the verdict in words; None without a baseline."""
    rows = _rows(ProfileReport.coerce(report))
    if rows is None:
        return None
    by_field = {r.field: r for r in rows}
    weights = by_field.get("memory.weights_bytes") or ComparisonRow()
    sizes = [_number(weights.baseline), _number(weights.artifact)]
    unit, scale = ("GiB", 2.0**30) if max((s for s in sizes if s is not None), default=0.0) >= 2**30 else ("MiB", 2.0**20)
    cells = []
    for field in SUMMARY_FIELDS:
        row = by_field.get(field)
        if row is None:
            continue
        if field == "memory.weights_bytes":
            metric, values = f"weights ({unit})", [_scaled(row.baseline, scale), _scaled(row.artifact, scale)]
        else:
            metric, values = str(row.metric), [fmt(row.baseline), fmt(row.artifact)]
        cells.append([metric, *values, fmt_interval(row), row.verdict if row.verdict is not None else NA])
    return ("Source vs artifact", ["metric", "source", "artifact", "ratio [95% CI]", "verdict"], cells)


def comparison_warnings(report: ProfileReport | Mapping[str, Any]) -> list[str]:
    """Where the artifact is slower than its source (one line per throughput figure)."""
    comparison = ProfileReport.coerce(report).comparison
    return list(comparison.warnings or []) if comparison is not None else []


def contention_warning(report: ProfileReport | Mapping[str, Any]) -> str | None:
    """The sentence `hardware.contention.warning` holds when the machine was busy during the run."""
    return ProfileReport.coerce(report).at("hardware.contention.warning") or None


def throughput_notes(report: ProfileReport | Mapping[str, Any]) -> list[str]:
    """Why offline throughput fell below online, where it did (`throughput.notes`)."""
    throughput = ProfileReport.coerce(report).throughput
    return list(throughput.notes or []) if throughput is not None else []


def kpi_value(check: KpiCheck | Mapping[str, Any]) -> str:
    """A check's value, with its 95% interval where the gate compares a ratio measured in repeats."""
    check = check if isinstance(check, KpiCheck) else KpiCheck.model_validate(check)
    value = fmt(check.value)
    low, high = _number(check.ci_low), _number(check.ci_high)
    return value if low is None or high is None else f"{value} [{low:.3g}, {high:.3g}]"


def _gbs(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _pct(share: float) -> str:
    return f"{share:.0%}" if share >= 0.1 else f"{share:.1%}"


def roofline_line(report: ProfileReport | Mapping[str, Any]) -> str | None:
    """One line: batch-1 decode's achieved weight-read bandwidth, and its share of the machine's peak."""
    roof = ProfileReport.coerce(report).roofline
    if roof is None:
        return None
    peak = _number(roof.peak_bandwidth_gbs)
    source = roof.peak_source or ""
    how = "measured" if source.startswith("measured") else source or NA

    def side(name: str, figures, with_peak: bool) -> str:
        achieved = _number(figures.achieved_gbs) if figures else None
        share = _number(figures.share_of_peak) if figures else None
        text = f"{name} {NA}" if achieved is None else f"{name} {_gbs(achieved)} GB/s"
        if share is not None:
            text += f" = {_pct(share)}"
        if with_peak:
            text += f" of {_gbs(peak)} GB/s peak ({how})" if peak is not None else f" (peak {NA}: {how})"
        return text

    parts = [side("artifact", roof.artifact, True)]
    if roof.baseline is not None:
        parts.append(side("source", roof.baseline, False))
    return "roofline (batch-1 decode): " + "; ".join(parts)


def head_line(report: ProfileReport | Mapping[str, Any]) -> str | None:
    """One line: what the LM head weighs and costs a decode step, and an int8 head's measured accuracy cost."""
    report = ProfileReport.coerce(report)
    cost = report.throughput.lm_head if report.throughput is not None else None
    nbytes = _number(cost.bytes) if cost is not None else None
    if nbytes is None:
        return None
    share, ms = _number(cost.share_of_weights), _number(cost.ms_per_step_batch1)
    text = f"LM head: {nbytes / 2**20:.1f} MiB"
    if share is not None:
        text += f" ({_pct(share)} of the weights)"
    if ms is not None:
        text += f", {ms:.2f} ms a decode step at batch 1"
    head = report.accuracy.lm_head if report.accuracy is not None else None
    if isinstance(head, Mapping):
        kld, top1 = _number(head.get("kld_mean")), _number(head.get("top1_agreement"))
        text += (f"; {head.get('format')} head vs dense: KLD {NA if kld is None else f'{kld:.4f}'}, "
                 f"top-1 {NA if top1 is None else f'{top1:.3f}'}")
    return text


def kpi_scope_lines(report: ProfileReport | Mapping[str, Any]) -> list[str]:
    """Which of the KPI file's keys the run applied, which it only recorded (production-only), and the
    alert_window's windows (`optcli.bench.kpi_scope`); nothing for a report without them."""
    kpi = ProfileReport.coerce(report).kpi
    if kpi is None:
        return []
    lines = []
    if kpi.applied:
        lines.append(f"Applied: {', '.join(kpi.applied)}")
    if kpi.production_only:
        lines.append("Recorded, not applied (production-only, `serve --kpi` watches them): "
                     + "; ".join(f"{p['key']} ({p['why']})" for p in kpi.production_only))
    windows = kpi.windows
    if windows:
        worst = windows["worst"]
        lines.append(f"alert_window {windows['window_s']:g} s: {len(windows['windows'])} window(s) of "
                     f"{windows['metric']} latency, worst p95 {fmt(worst['p95'])} ms, p99 {fmt(worst['p99'])} ms"
                     + (f" ({windows['note']})" if windows.get("note") else ""))
    return lines


def kpi_rows(report: ProfileReport | Mapping[str, Any]) -> list[KpiCheck]:
    kpi = ProfileReport.coerce(report).kpi
    return list(kpi.checks or []) if kpi is not None else []


def kernel_summary(kernels: Any) -> Any:
    """`workload.engine.kernels` in one line: each layer kind's kernel per batch-size bucket, equal
    neighbours merged ("qkv q4-vnni (all), lm_head bf16-dpbf16 (1-4) / onednn-bf16 (5-16..>256)")."""
    if not isinstance(kernels, Mapping):
        return kernels
    parts = []
    for kind, info in kernels.items():
        buckets = info.get("buckets") if isinstance(info, Mapping) else None
        if not isinstance(buckets, Mapping):
            continue
        runs: list[list] = []  # [kernel, first bucket, last bucket]
        for bucket, pick in buckets.items():
            name = pick.get("kernel") if isinstance(pick, Mapping) else pick
            if runs and runs[-1][0] == name:
                runs[-1][2] = bucket
            else:
                runs.append([name, bucket, bucket])
        spans = ["all" if len(runs) == 1 else (a if a == b else f"{a}..{b}") for _, a, b in runs]
        parts.append(f"{kind} " + " / ".join(f"{k} ({s})" for (k, _, _), s in zip(runs, spans, strict=True)))
    return ", ".join(parts)


def header_fields(report: ProfileReport | Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, text) for the report's header: model, baseline, recipe, the machine and the workload."""
    report = ProfileReport.coerce(report)
    hardware = report.hardware.to_dict() if report.hardware is not None else None
    if hardware is not None:  # contention has its own line (contention_warning)
        hardware.pop("contention", None)
    workload = report.workload.to_dict() if report.workload is not None else None
    if workload is not None and isinstance(workload.get("engine"), Mapping):
        # the kernels with their reasons fill pages: here just which kernel runs where (report.json has all)
        workload["engine"] = {k: kernel_summary(v) if k in ("kernels", "baseline_kernels") else v
                              for k, v in workload["engine"].items()}
    return [("model", fmt(report.model)), ("baseline", fmt(report.baseline)), ("recipe", fmt(report.recipe)),
            ("hardware", fmt(hardware)), ("workload", fmt(workload))]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(report: ProfileReport | Mapping[str, Any]) -> str:
    """PR-sized Markdown: header line, one small table per section, then the KPI checks."""
    report = ProfileReport.coerce(report)
    head = header_fields(report)
    lines = [f"## optcli profile: {_cell(head[0][1])}", ""]
    lines.append(" · ".join(f"**{k}** {_cell(v)}" for k, v in head))
    busy = contention_warning(report)
    if busy:
        lines += ["", "> [!WARNING]", f"> **Busy machine:** {_cell(busy)}"]
    warnings = comparison_warnings(report)
    if warnings:
        lines += ["", "> [!WARNING]", "> **Slower than its source:**", *(f"> - {_cell(w)}" for w in warnings)]
    notes = throughput_notes(report)
    if notes:
        lines += ["", "> [!NOTE]", "> **Offline below online:**", *(f"> - {_cell(n)}" for n in notes)]
    comparison = comparison_table(report)
    if comparison is not None:
        title, headers, rows = comparison
        lines += ["", f"**{title}**", "", *_md_table(headers, rows)]
        caption = comparison_caption(report)
        if caption:
            lines += ["", f"<sub>{_cell(caption)}</sub>"]
    for line in (roofline_line(report), head_line(report)):
        if line is not None:
            lines += ["", _cell(line)]
    for title, headers, rows in report_tables(report):
        lines += ["", f"**{title}**", "", *_md_table(headers, rows)]
    checks = kpi_rows(report)
    passed = report.kpi.passed if report.kpi is not None else None
    lines += ["", "**KPI**", ""]
    if not checks and passed is None:
        lines.append(NA)
    else:
        verdict = NA if passed is None else ("✅ passed" if passed else "❌ failed")
        lines.append(f"Overall: {verdict}" + ("" if checks else " (no gates set)"))
        if checks:
            lines += ["", *_md_table(["", "check", "threshold", "value", "baseline"],
                           [["✅" if c.passed else "❌", fmt(c.name), fmt(c.threshold),
                             kpi_value(c), fmt(c.baseline)] for c in checks])]
    lines += [line for scope in kpi_scope_lines(report) for line in ("", _cell(scope))]
    versions = report.versions
    if versions:
        lines += ["", f"<sub>versions: {_cell(fmt(versions))}</sub>"]
    return "\n".join(lines) + "\n"
