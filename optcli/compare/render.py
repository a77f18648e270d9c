"""The comparison tables as cells (one function for the terminal, Markdown and HTML alike) and the
accuracy-vs-speed Pareto plot. Renders finished reports: nothing is measured here."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from html import escape
from typing import Any

from optcli.report.markdown import NA, fmt_interval

METHOD_HEADERS = ["method", "bits/weight", "ppl change", "KLD mean", "top-1", "tasks (recovery)",
                  "speedup batch 1", "speedup at load", "speedup offline", "weights reduction", "peak memory reduction", "USD/1K tok",
                  "best for", "KPI"]


def _num(value: Any, spec: str) -> str:
    return NA if value is None else format(value, spec)


def _pct(value: Any) -> str:
    return NA if value is None else f"{value:+.1%}"


def _tasks(tasks: Any) -> str:
    if not tasks:
        return NA
    return ", ".join(f"{t['task']} {_num(t.get('candidate'), '.3f')} ({_num(t.get('recovery'), '.2f')})" for t in tasks)


def _kpi(kpi: Mapping | None) -> str:
    if kpi is None:
        return NA
    if kpi["passed"]:
        return "pass"
    return "FAIL: " + ", ".join(c["name"] for c in kpi["failing"])


def method_cells(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for row in report["rows"]:
        acc, mem = row["accuracy"], row["memory_reduction"]
        chosen = " (best)" if row["method"] == report.get("best") else ""
        rows.append([
            row["method"] + chosen, _num(row["bits_per_weight"], ".2f"), _pct(acc["ppl_change"]),
            _num(acc["kld_mean"], ".4f"), _num(acc["top1_agreement"], ".3f"), _tasks(acc.get("tasks")),
            fmt_interval(row["speedup"]["batch1"]), fmt_interval(row["speedup"]["load"]),
            fmt_interval(row["speedup"]["offline"]),
            NA if mem["weights"] is None else f"{mem['weights']:.0%}",
            NA if mem.get("peak") is None else f"{mem['peak']:.0%}", _num(row["usd_per_1k_tokens"], ".5f"),
            "; ".join(row["best_for"]) or "-", _kpi(row["kpi"])])
    return METHOD_HEADERS, rows


def method_notes(report: Mapping[str, Any]) -> list[str]:
    """What a reader of the methods table must know to read it: why a column is n/a, what ranked `best`."""
    notes = []
    candidates = report["rows"][1:]
    whys = {r["memory_reduction"].get("peak_why") for r in candidates if r["memory_reduction"].get("peak") is None}
    notes += [f"peak memory reduction n/a: {why}" for why in sorted(w for w in whys if w)]
    if report.get("objective") == "cost" and all(r["usd_per_1k_tokens"] is None for r in candidates):
        notes.append("best by cost without --gpu-hour-cost: the highest offline throughput against the source "
                     "(at a fixed price, cost per token is 1 / throughput)")
    return notes


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pareto_front(points: list[tuple[str, float, float]]) -> set[str]:
    """Names of the points no other point beats on both axes (higher speed, higher accuracy)."""
    front = set()
    for name, x, y in points:
        if not any((ox >= x and oy >= y) and (ox > x or oy > y) for _, ox, oy in points):
            front.add(name)
    return front


def pareto_png(report: Mapping[str, Any]) -> bytes | None:
    """Top-1 agreement with the source against the speedup at load (95% interval as error bars), the
    Pareto front joined and labelled; None when fewer than two methods have both figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["method"], r["speedup"]["load"], r["accuracy"]["top1_agreement"]) for r in report["rows"]]
    pts = [(m, s, a) for m, s, a in pts if s.get("ratio") is not None and a is not None]
    if len(pts) < 2:
        return None
    front = pareto_front([(m, s["ratio"], a) for m, s, a in pts])
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for method, speed, acc in pts:
            x = speed["ratio"]
            lo, hi = speed.get("ci_low"), speed.get("ci_high")
            err = [[x - lo], [hi - x]] if lo is not None and hi is not None else None
            on = method in front
            ax.errorbar([x], [acc], xerr=err, fmt="o" if on else "x", color="tab:red" if on else "tab:gray", capsize=3)
            ax.annotate(method, (x, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)
        line = sorted((s["ratio"], a) for m, s, a in pts if m in front)
        ax.plot([p[0] for p in line], [p[1] for p in line], "--", color="tab:red", label="Pareto front")
        ax.set_xlabel("speedup at load (output tok/s vs source, 95% interval)")
        ax.set_ylabel("top-1 agreement with the source")
        ax.set_title(f"accuracy vs speed · {report['model']}")
        ax.legend()
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()
    finally:
        plt.close(fig)


def render_markdown(report: Mapping[str, Any], cells) -> str:
    title = "optimizations" if report.get("kind") == "optimizations" else "quantization methods"
    lines = [f"# optcli compare · {title} · {report['model']}", ""]
    lines += [markdown_table(*cells), ""]
    if report.get("best") is not None or report.get("objective"):
        lines += [f"best by {report.get('objective')}: **{report.get('best') or 'none'}**", ""]
    for note in report["notes"] if "notes" in report else method_notes(report):
        lines.append(f"- {note}")
    lines += ["", f"How measured: {report.get('method', '')}", ""]
    return "\n".join(lines)


def render_html(report: Mapping[str, Any], cells, png: bytes | None) -> str:
    md_title = "optimizations" if report.get("kind") == "optimizations" else "quantization methods"
    img = "" if png is None else (
        f'<img alt="Pareto plot" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
    notes = "".join(f"<li>{escape(n)}</li>" for n in (report["notes"] if "notes" in report else method_notes(report)))
    best = (f"<p>best by {escape(str(report.get('objective')))}: <b>{escape(str(report.get('best') or 'none'))}</b></p>"
            if report.get("objective") else "")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>optcli compare</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}td:first-child{text-align:left}"
            f"</style></head><body><h1>optcli compare · {escape(md_title)} · {escape(str(report['model']))}</h1>"
            f"{html_table(*cells)}{best}{img}<ul>{notes}</ul><p>How measured: {escape(report.get('method', ''))}</p>"
            "</body></html>\n")
