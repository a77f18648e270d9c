"""Markdown summary of a profile report, compact enough to paste into a pull request.

The tables are built once here (`report_tables`) and reused by the HTML renderer so both show the
same figures. Anything null in the report is shown as "n/a": a report never invents numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NA = "n/a"
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
STATS = ("mean", "p50", "p95", "p99")


def get(report: Mapping[str, Any] | None, *keys: str) -> Any:
    """Nested lookup that yields None for anything missing, so partial reports still render."""
    node: Any = report
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


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
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={fmt(v) if not isinstance(v, str) else v}" for k, v in value.items()) or NA
    return str(value)


def _number(value: Any) -> float | None:
    return None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)


def _memory_unit(report: Mapping[str, Any]) -> tuple[str, float]:
    sizes = [_number(get(report, "memory", k)) for k in ("weights_bytes", "peak_bytes", "kv_cache_bytes")]
    biggest = max((s for s in sizes if s is not None), default=0.0)
    return ("GiB", 2.0**30) if biggest >= 2**30 else ("MiB", 2.0**20)


def _scaled(value: Any, scale: float) -> str:
    number = _number(value)
    return NA if number is None else f"{number / scale:,.2f}"


Table = tuple[str, list[str], list[list[str]]]  # (title, header cells, rows of cells)


def report_tables(report: Mapping[str, Any]) -> list[Table]:
    """The report's sections as plain-text tables (title, headers with units, rows)."""
    unit, scale = _memory_unit(report)
    tables: list[Table] = [
        ("Throughput", ["output (tok/s)", "total (tok/s)", "requests (req/s)"],
         [[fmt(get(report, "throughput", k)) for k in ("output_tok_s", "total_tok_s", "requests_s")]]),
        ("Latency", ["metric", *(f"{s} (ms)" for s in STATS)],
         [[m, *(fmt(get(report, "latency_ms", m, s)) for s in STATS)] for m in LATENCY_METRICS]),
        ("Memory", [f"weights ({unit})", f"peak ({unit})", f"KV cache ({unit})"],
         [[_scaled(get(report, "memory", k), scale) for k in ("weights_bytes", "peak_bytes", "kv_cache_bytes")]]),
        ("Accuracy", ["ppl", "baseline ppl", "ppl ratio", "KLD mean (nats)", "KLD p99 (nats)", "top-1 agreement"],
         [[fmt(get(report, "accuracy", k))
           for k in ("ppl", "baseline_ppl", "ppl_ratio", "kld_mean", "kld_p99", "top1_agreement")]]),
        ("Efficiency and cost", ["batch efficiency", "GPU utilization", "cost (USD / 1k tokens, prompt + generated)",
                                 "cost (USD / 1k output tokens)"],
         [[fmt(get(report, "batch_efficiency")), fmt(get(report, "gpu_utilization")),
           fmt(get(report, "cost", "usd_per_1k_tokens")), fmt(get(report, "cost", "usd_per_1k_output_tokens"))]]),
    ]
    levels = get(report, "throughput", "sweep")
    if isinstance(levels, list) and len(levels) > 1:
        tables.append(load_levels_table(report, levels))
    tasks = get(report, "accuracy", "tasks")
    if isinstance(tasks, list) and tasks:
        tables.append(("Tasks (lm-evaluation-harness)", ["task", "metric", "candidate", "baseline", "recovery"],
                       [[fmt(t.get("task")), fmt(t.get("metric")), fmt(t.get("candidate")), fmt(t.get("baseline")),
                         fmt(t.get("recovery"))] for t in tasks if isinstance(t, Mapping)]))
    return tables


def load_levels_table(report: Mapping[str, Any], levels: list) -> Table:
    """One row per load level (a sweep, rate or concurrency list): the curve saturation is read from."""
    best = get(report, "throughput", "slo_max_rate")
    title = "Load levels" + (f" (SLO-max-rate: {fmt(best.get('requests_s'))} req/s at {best.get('level')})"
                             if isinstance(best, Mapping) else "")
    rows = []
    for p in levels:
        if not isinstance(p, Mapping):
            continue
        lat = p.get("latency_ms") or {}
        slo = p.get("slo") or {}
        met = slo.get("met")
        rows.append([fmt(p.get("label", p.get("concurrency"))), fmt(p.get("achieved_rate_requests_s")),
                     fmt(p.get("requests_s")), fmt(p.get("output_tok_s")),
                     *(fmt(get(lat, m, s)) for m, s in (("ttft", "p50"), ("ttft", "p95"), ("tpot", "p50"),
                                                         ("itl", "p95"), ("e2e", "p50"), ("e2e", "p95"), ("e2e", "p99"))),
                     fmt((p.get("requests") or {}).get("failed")),
                     NA if met is None else ("yes" if met else "no"), fmt(slo.get("attainment")),
                     fmt(slo.get("goodput_requests_s"))])
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


def fmt_interval(row: Mapping[str, Any]) -> str:
    """A comparison row's ratio with its 95% interval: "1.22x [1.18, 1.26]"; the ratio alone without one."""
    ratio = fmt_ratio(row.get("ratio"))
    low, high = _number(row.get("ci_low")), _number(row.get("ci_high"))
    if ratio == NA or low is None or high is None:
        return ratio
    return f"{ratio} [{_bound(low)}, {_bound(high)}]"


def comparison_caption(report: Mapping[str, Any]) -> str | None:
    """How the comparison's figures were taken, under its table: repeats, order, the interval."""
    rows = get(report, "comparison", "rows")
    if not isinstance(rows, list):
        return None
    repeats = max((r.get("repeats") or 0 for r in rows if isinstance(r, Mapping)), default=0)
    if repeats >= 2:
        return (f"medians of {repeats} interleaved repeats (source and artifact alternating); ratio: the median of "
                "the repeats' artifact / source pairs [95% confidence interval]; a verdict needs the whole interval "
                "on one side of 1.00x")
    if repeats == 1:
        return "ratio = artifact / source; one repeat: no interval, so no verdict (--repeats 2 or more for one)"
    return "ratio = artifact / source"


def comparison_table(report: Mapping[str, Any]) -> Table | None:
    """Source vs artifact, one row per summary figure with the artifact/source ratio, its 95% interval and
    the verdict in words; None without a baseline."""
    rows = get(report, "comparison", "rows")
    if not isinstance(rows, list):
        return None
    by_field = {r.get("field"): r for r in rows if isinstance(r, Mapping)}
    sizes = [_number(by_field.get("memory.weights_bytes", {}).get(k)) for k in ("baseline", "artifact")]
    unit, scale = ("GiB", 2.0**30) if max((s for s in sizes if s is not None), default=0.0) >= 2**30 else ("MiB", 2.0**20)
    cells = []
    for field in SUMMARY_FIELDS:
        row = by_field.get(field)
        if row is None:
            continue
        if field == "memory.weights_bytes":
            metric, values = f"weights ({unit})", [_scaled(row.get(k), scale) for k in ("baseline", "artifact")]
        else:
            metric, values = str(row.get("metric")), [fmt(row.get(k)) for k in ("baseline", "artifact")]
        verdict = row.get("verdict")
        cells.append([metric, *values, fmt_interval(row), verdict if isinstance(verdict, str) else NA])
    return ("Source vs artifact", ["metric", "source", "artifact", "ratio [95% CI]", "verdict"], cells)


def comparison_warnings(report: Mapping[str, Any]) -> list[str]:
    """Where the artifact is slower than its source (one line per throughput figure)."""
    warnings = get(report, "comparison", "warnings")
    return [str(w) for w in warnings] if isinstance(warnings, list) else []


def contention_warning(report: Mapping[str, Any]) -> str | None:
    """The sentence `hardware.contention.warning` holds when the machine was busy during the run."""
    warning = get(report, "hardware", "contention", "warning")
    return str(warning) if warning else None


def throughput_notes(report: Mapping[str, Any]) -> list[str]:
    """Why offline throughput fell below online, where it did (`throughput.notes`)."""
    notes = get(report, "throughput", "notes")
    return [str(n) for n in notes] if isinstance(notes, list) else []


def kpi_value(check: Mapping[str, Any]) -> str:
    """A check's value, with its 95% interval where the gate compares a ratio measured in repeats."""
    value = fmt(check.get("value"))
    low, high = _number(check.get("ci_low")), _number(check.get("ci_high"))
    return value if low is None or high is None else f"{value} [{low:.3g}, {high:.3g}]"


def _gbs(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _pct(share: float) -> str:
    return f"{share:.0%}" if share >= 0.1 else f"{share:.1%}"


def roofline_line(report: Mapping[str, Any]) -> str | None:
    """One line: batch-1 decode's achieved weight-read bandwidth, and its share of the machine's peak."""
    roof = get(report, "roofline")
    if not isinstance(roof, Mapping):
        return None
    peak = _number(roof.get("peak_bandwidth_gbs"))
    source = str(roof.get("peak_source") or "")
    how = "measured" if source.startswith("measured") else source or NA

    def side(name: str, key: str, with_peak: bool) -> str:
        achieved, share = _number(get(roof, key, "achieved_gbs")), _number(get(roof, key, "share_of_peak"))
        text = f"{name} {NA}" if achieved is None else f"{name} {_gbs(achieved)} GB/s"
        if share is not None:
            text += f" = {_pct(share)}"
        if with_peak:
            text += f" of {_gbs(peak)} GB/s peak ({how})" if peak is not None else f" (peak {NA}: {how})"
        return text

    parts = [side("artifact", "artifact", True)]
    if isinstance(roof.get("baseline"), Mapping):
        parts.append(side("source", "baseline", False))
    return "roofline (batch-1 decode): " + "; ".join(parts)


def head_line(report: Mapping[str, Any]) -> str | None:
    """One line: what the LM head weighs and costs a decode step, and an int8 head's measured accuracy cost."""
    nbytes, share = _number(get(report, "throughput", "lm_head", "bytes")), _number(get(report, "throughput", "lm_head", "share_of_weights"))
    if nbytes is None:
        return None
    ms = _number(get(report, "throughput", "lm_head", "ms_per_step_batch1"))
    text = f"LM head: {nbytes / 2**20:.1f} MiB"
    if share is not None:
        text += f" ({_pct(share)} of the weights)"
    if ms is not None:
        text += f", {ms:.2f} ms a decode step at batch 1"
    head = get(report, "accuracy", "lm_head")
    if isinstance(head, Mapping):
        kld, top1 = _number(head.get("kld_mean")), _number(head.get("top1_agreement"))
        text += (f"; {head.get('format')} head vs dense: KLD {NA if kld is None else f'{kld:.4f}'}, "
                 f"top-1 {NA if top1 is None else f'{top1:.3f}'}")
    return text


def kpi_scope_lines(report: Mapping[str, Any]) -> list[str]:
    """Which of the KPI file's keys the run applied, which it only recorded (production-only), and the
    alert_window's windows (`optcli.bench.kpi_scope`); nothing for a report without them."""
    lines = []
    applied, production = get(report, "kpi", "applied"), get(report, "kpi", "production_only")
    if applied:
        lines.append(f"Applied: {', '.join(applied)}")
    if production:
        lines.append("Recorded, not applied (production-only, `serve --kpi` watches them): "
                     + "; ".join(f"{p['key']} ({p['why']})" for p in production))
    windows = get(report, "kpi", "windows")
    if windows:
        worst = windows["worst"]
        lines.append(f"alert_window {windows['window_s']:g} s: {len(windows['windows'])} window(s) of "
                     f"{windows['metric']} latency, worst p95 {fmt(worst['p95'])} ms, p99 {fmt(worst['p99'])} ms"
                     + (f" ({windows['note']})" if windows.get("note") else ""))
    return lines


def kpi_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    checks = get(report, "kpi", "checks")
    return [c for c in checks if isinstance(c, Mapping)] if isinstance(checks, list) else []


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


def header_fields(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    def value(key: str) -> str:
        node = get(report, key)
        if key == "hardware" and isinstance(node, Mapping):  # contention has its own line (contention_warning)
            node = {k: v for k, v in node.items() if k != "contention"}
        if key == "workload" and isinstance(node, Mapping) and isinstance(node.get("engine"), Mapping):
            # the kernels with their reasons fill pages: here just which kernel runs where (report.json has all)
            engine = {k: kernel_summary(v) if k in ("kernels", "baseline_kernels") else v
                      for k, v in node["engine"].items()}
            node = {**node, "engine": engine}
        return fmt(node)

    return [(k, value(k)) for k in ("model", "baseline", "recipe", "hardware", "workload")]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """PR-sized Markdown: header line, one small table per section, then the KPI checks."""
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
    passed = get(report, "kpi", "passed")
    lines += ["", "**KPI**", ""]
    if not checks and passed is None:
        lines.append(NA)
    else:
        verdict = NA if passed is None else ("✅ passed" if passed else "❌ failed")
        lines.append(f"Overall: {verdict}" + ("" if checks else " (no gates set)"))
        if checks:
            lines += ["", *_md_table(["", "check", "threshold", "value", "baseline"],
                           [["✅" if c.get("passed") else "❌", fmt(c.get("name")), fmt(c.get("threshold")),
                             kpi_value(c), fmt(c.get("baseline"))] for c in checks])]
    lines += [line for scope in kpi_scope_lines(report) for line in ("", _cell(scope))]
    versions = get(report, "versions")
    if versions:
        lines += ["", f"<sub>versions: {_cell(fmt(versions))}</sub>"]
    return "\n".join(lines) + "\n"
