"""Self-contained HTML report: inline CSS, plots embedded as data: URIs, no network fetches.

A single file can be attached to a CI run or mailed around and still render offline.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from optcli.report import plots
from optcli.report.markdown import (
    NA,
    comparison_caption,
    comparison_table,
    comparison_warnings,
    contention_warning,
    fmt,
    get,
    head_line,
    header_fields,
    kpi_rows,
    kpi_scope_lines,
    kpi_value,
    report_tables,
    roofline_line,
    throughput_notes,
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}dd{margin:0}
.pass{background:#e3f6e3;color:#135c13}.fail{background:#fbe3e3;color:#8a1111}.na{color:#888}
img{max-width:100%;display:block;margin:.6em 0;border:1px solid #eee}
.warn{background:#fff4d6;border:1px solid #e0a800;border-left:6px solid #e0a800;padding:.5em 1em;margin:1em 0}
.warn ul,.note ul{margin:.3em 0;padding-left:1.4em}
.note{background:#eef4ff;border:1px solid #7a9cd6;border-left:6px solid #7a9cd6;padding:.5em 1em;margin:1em 0}
"""


def _img(alt: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _td(text: str, tag: str = "td", cls: str | None = None) -> str:
    """A cell; by default an "n/a" cell is greyed out."""
    if cls is None:
        cls = "na" if text == NA else ""
    attr = f' class="{cls}"' if cls else ""
    return f"<{tag}{attr}>{escape(text)}</{tag}>"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(_td(h, "th", "") for h in headers)
    body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sweep_points(sweep: Any) -> list[tuple[int, float | None]]:
    """Accept [(concurrency, tok_s), ...] or [{"concurrency": c, "output_tok_s": t}, ...]."""
    points = []
    for item in sweep or []:
        if isinstance(item, Mapping) and item.get("mode") not in (None, "concurrent"):
            continue  # a rate level: in the load curves
        if isinstance(item, Mapping):
            points.append((item.get("concurrency"), get(item, "output_tok_s") or get(item, "throughput", "output_tok_s")))
        elif isinstance(item, Sequence) and len(item) == 2:
            points.append((item[0], item[1]))
    return [(int(c), t) for c, t in points if isinstance(c, int | float)]


def render_html(report: Mapping[str, Any], samples: Mapping[str, Any] | None = None,
                sweep: Sequence[Any] | None = None, baseline_report: Mapping[str, Any] | None = None) -> str:
    """One HTML page with the same tables as the Markdown plus the plots whose data was given.

    samples: per-request latencies for `plots.latency_cdf`; sweep: concurrency sweep points;
    baseline_report: the baseline's report dict, for the baseline-vs-candidate bars.
    """
    head = header_fields(report)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>optcli profile: {escape(head[0][1])}</title><style>{_CSS}</style></head><body>",
             f"<h1>optcli profile: {escape(head[0][1])}</h1>", "<dl>"]
    parts += [f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in head]
    parts.append("</dl>")
    busy = contention_warning(report)
    if busy:
        parts.append(f'<div class="warn busy" role="alert"><strong>⚠ Busy machine:</strong> {escape(busy)}</div>')
    warnings = comparison_warnings(report)
    if warnings:
        items = "".join(f"<li>{escape(w)}</li>" for w in warnings)
        parts.append(f'<div class="warn" role="alert"><strong>⚠ Slower than its source</strong><ul>{items}</ul></div>')
    notes = throughput_notes(report)
    if notes:
        items = "".join(f"<li>{escape(n)}</li>" for n in notes)
        parts.append(f'<div class="note"><strong>Offline below online</strong><ul>{items}</ul></div>')

    checks = kpi_rows(report)
    passed = get(report, "kpi", "passed")
    parts.append("<h2>KPI</h2>")
    if not checks and passed is None:
        parts.append(f'<p class="na">{NA}</p>')
    else:
        verdict, cls = (NA, "na") if passed is None else (("passed", "pass") if passed else ("failed", "fail"))
        note = "" if checks else " (no gates set)"
        parts.append(f'<p>Overall: <strong class="{cls}">{verdict}</strong>{note}</p>')
        rows = []
        for c in checks:
            ok = bool(c.get("passed"))
            cells = [("✔ pass" if ok else "✘ fail"), fmt(c.get("name")), fmt(c.get("threshold")), kpi_value(c),
                     fmt(c.get("baseline"))]
            rows.append(f'<tr class="{"pass" if ok else "fail"}">' + "".join(_td(x, cls="") for x in cells) + "</tr>")
        if rows:
            parts.append("<table><thead><tr><th>result</th><th>check</th><th>threshold</th><th>value</th><th>baseline</th></tr></thead>"
                         f"<tbody>{''.join(rows)}</tbody></table>")
        parts += [f"<p>{escape(line)}</p>" for line in kpi_scope_lines(report)]

    comparison = comparison_table(report)
    if comparison is not None:
        title, headers, rows = comparison
        parts += [f"<h2>{escape(title)}</h2>", _table(headers, rows)]
        caption = comparison_caption(report)
        if caption:
            parts.append(f'<p class="caption"><small>{escape(caption)}</small></p>')
    roofline = roofline_line(report)
    if roofline is not None:
        parts.append(f'<p class="roofline">{escape(roofline)}</p>')
    head = head_line(report)
    if head is not None:
        parts.append(f'<p class="lm-head">{escape(head)}</p>')
    for title, headers, rows in report_tables(report):
        parts += [f"<h2>{escape(title)}</h2>", _table(headers, rows)]

    figures = []
    if samples:
        figures.append(("Latency distribution", _img("latency CDF", plots.latency_cdf(samples))))
    if baseline_report is not None:
        figures.append(("Baseline vs candidate",
                        _img("baseline vs candidate", plots.comparison_bars(report, baseline_report))))
    levels = [p for p in sweep or [] if isinstance(p, Mapping) and p.get("achieved_rate_requests_s") is not None]
    if len(levels) > 1:
        figures.append(("Latency and goodput vs rate",
                        _img("latency and goodput vs rate", plots.load_curves(levels))))
    points = _sweep_points(sweep)
    if points:
        figures.append(("Throughput vs concurrency",
                        _img("throughput vs concurrency", plots.throughput_vs_concurrency(points))))
    for title, img in figures:
        parts += [f"<h2>{escape(title)}</h2>", img]

    versions = get(report, "versions")
    if versions:
        parts.append(f'<p class="na"><small>versions: {escape(fmt(versions))}</small></p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
