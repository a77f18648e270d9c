"""Report figures as PNG bytes, so the HTML report can embed them and stay a single file.

Agg is selected before pyplot is imported: reports are written on headless machines.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
_SIZE = (8, 5)  # inches; at dpi 100 -> 800x500 px
_DPI = 100


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=_DPI)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _is_series(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def latency_cdf(samples: Mapping[str, Any]) -> bytes:
    """Empirical CDF per latency metric, one subplot each (ttft, tpot, itl, e2e; ms).

    `samples` is either one system, ``{"ttft": [ms, ...], "tpot": [...], ...}``, or several systems
    to overlay, ``{"candidate": {"ttft": [...], ...}, "baseline": {...}}``. Missing or empty
    metrics show "n/a" in their panel rather than an invented curve.
    """
    if samples and all(_is_series(v) or v is None for v in samples.values()):
        systems: dict[str, Mapping[str, Any]] = {"": samples}
    else:
        systems = {str(k): (v or {}) for k, v in samples.items()}
    fig, axes = plt.subplots(2, 2, figsize=_SIZE)
    for ax, metric in zip(axes.flat, LATENCY_METRICS, strict=True):
        drawn = False
        for name, per_metric in systems.items():
            values = sorted(float(v) for v in (per_metric.get(metric) or []) if v is not None)
            if not values:
                continue
            n = len(values)
            ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=name or None)
            drawn = True
        ax.set_title(f"{metric} CDF")
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, fontsize=14)
        elif len(systems) > 1 or next(iter(systems)):
            ax.legend(fontsize=8)
    return _png(fig)


def _get(report: Mapping[str, Any], *keys: str) -> float | None:
    node: Any = report
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return None if isinstance(node, bool) or not isinstance(node, int | float) else float(node)


_BARS = (
    ("perplexity", ("accuracy", "ppl"), 1.0),
    ("weights (GiB)", ("memory", "weights_bytes"), 2.0**30),
    ("peak memory (GiB)", ("memory", "peak_bytes"), 2.0**30),
    ("output tok/s", ("throughput", "output_tok_s"), 1.0),
)


def comparison_bars(candidate: Mapping[str, Any], baseline: Mapping[str, Any]) -> bytes:
    """Baseline vs candidate bars for accuracy (ppl), memory (weights, peak) and speed (output tok/s).

    Both arguments are report dicts. Each quantity has its own panel since units differ; a missing
    value is labelled "n/a" instead of drawn as zero.
    """
    fig, axes = plt.subplots(1, len(_BARS), figsize=_SIZE)
    for ax, (title, keys, scale) in zip(axes, _BARS, strict=True):
        values = [_get(baseline, *keys), _get(candidate, *keys)]
        heights = [0.0 if v is None else v / scale for v in values]
        bars = ax.bar(["baseline", "candidate"], heights, color=["#8c8c8c", "#1f77b4"])
        for bar, v, h in zip(bars, values, heights, strict=True):
            label = "n/a" if v is None else (f"{h:,.0f}" if h >= 1000 else f"{h:.3g}")
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, h),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.margins(y=0.15)
    return _png(fig)


def throughput_vs_concurrency(points: Sequence[tuple[int, float | None]]) -> bytes:
    """Output tokens/s against request concurrency from a sweep; points with no value are skipped."""
    pts = sorted((int(c), float(t)) for c, t in points if t is not None)
    fig, ax = plt.subplots(figsize=_SIZE)
    if pts:
        ax.plot([c for c, _ in pts], [t for _, t in pts], marker="o")
        ax.set_xscale("log", base=2)
    else:
        ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("output tok/s")
    ax.set_title("throughput vs concurrency")
    ax.grid(alpha=0.3)
    return _png(fig)


def load_curves(points: Sequence[Mapping[str, Any]]) -> bytes:
    """A load sweep's three views, one panel each, against the achieved request rate: latency percentiles
    (TTFT, TPOT, E2E p50 / p95), completed requests and goodput, and output tok/s against E2E p50 latency
    (the throughput-latency curve saturation is read from). Levels missing a figure are skipped in it."""
    fig, (lat_ax, good_ax, curve_ax) = plt.subplots(1, 3, figsize=(12, 4))
    pts = sorted((p for p in points if _get(p, "achieved_rate_requests_s") is not None),
                 key=lambda p: _get(p, "achieved_rate_requests_s"))
    rate = [_get(p, "achieved_rate_requests_s") for p in pts]

    def series(ax, xs, ys, **style) -> bool:
        pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
        if pairs:
            ax.plot([x for x, _ in pairs], [y for _, y in pairs], marker="o", **style)
        return bool(pairs)

    drawn = False
    for metric in ("ttft", "tpot", "e2e"):
        for pct, line in (("p50", "-"), ("p95", "--")):
            drawn |= series(lat_ax, rate, [_get(p, "latency_ms", metric, pct) for p in pts], linestyle=line,
                            label=f"{metric} {pct}")
    lat_ax.set(xlabel="achieved rate (req/s)", ylabel="latency (ms)", title="latency vs rate")
    lat_ax.set_yscale("log") if drawn else None
    good = series(good_ax, rate, [_get(p, "requests_s") for p in pts], label="completed")
    good |= series(good_ax, rate, [_get(p, "slo", "goodput_requests_s") for p in pts], label="goodput (within SLO)")
    good_ax.set(xlabel="achieved rate (req/s)", ylabel="requests/s", title="goodput vs rate")
    curve = series(curve_ax, [_get(p, "latency_ms", "e2e", "p50") for p in pts], [_get(p, "output_tok_s") for p in pts])
    curve_ax.set(xlabel="E2E p50 (ms)", ylabel="output tok/s", title="throughput vs latency")
    for ax, ok in ((lat_ax, drawn), (good_ax, good), (curve_ax, curve)):
        ax.grid(alpha=0.3)
        if not ok:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, fontsize=14)
        elif ax is not curve_ax:
            ax.legend(fontsize=7)
    return _png(fig)
