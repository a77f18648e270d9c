"""Capacity plan: replicas for a target request rate at a p95 latency SLO, and the seed article's
autoscaling policy replayed over a day's load trace.

The SLO is on p95 end-to-end latency (ms), read from the report's latency-vs-concurrency sweep
(`throughput.sweep`, written by `optcli profile --concurrency C1,C2,...`). One replica's capacity is
the requests/s of the highest-throughput sweep point whose p95 meets the SLO.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from optcli.errors import UsageError
from optcli.schema.report import ProfileReport, Throughput, Workload
from optcli.util.fs import check_out_file

SCALE_UP_UTILIZATION = 0.8  # scale up by one when p95 > SLO and utilization above this
SCALE_DOWN_UTILIZATION = 0.3  # scale down by one when utilization below this
TIME_COLUMNS = ("time", "timestamp", "t", "hour")
RATE_COLUMNS = ("requests_per_s", "requests_s", "rps", "requests_per_second")


@dataclass(frozen=True)
class Point:
    concurrency: int | None
    requests_s: float
    p95_ms: float


def sweep_points(report: ProfileReport) -> list[Point]:
    """Latency-vs-concurrency points of a report; older reports give their one online run."""
    tp = report.throughput or Throughput()
    workload = report.workload or Workload()
    raw = [(p.concurrency, p.requests_s, p.e2e_p95_ms) for p in tp.sweep or []]
    fixed_len = workload.output_len
    if not raw and tp.online_output_tok_s and isinstance(fixed_len, int) and fixed_len > 0:  # n tokens each
        raw = [(workload.concurrency, tp.online_output_tok_s / fixed_len, report.at("latency_ms.e2e.p95"))]
    points = [Point(c, rps, p95) for c, rps, p95 in raw if isinstance(rps, int | float) and isinstance(p95, int | float)]
    if not points:
        raise UsageError("report lacks 'throughput.sweep' (latency vs concurrency): rerun optcli profile with "
                         "--concurrency 1,4,16 for a capacity plan")
    return points


def per_replica(points: list[Point], slo_ms: float | None) -> Point:
    """The highest-throughput point within the SLO (any point without an SLO)."""
    ok = [p for p in points if slo_ms is None or p.p95_ms <= slo_ms]
    if not ok:
        best = min(points, key=lambda p: p.p95_ms)
        raise UsageError(f"no measured concurrency meets p95 <= {slo_ms:g} ms (lowest p95: {best.p95_ms:.1f} ms "
                         f"at concurrency {best.concurrency}); relax --p95-slo-ms or use a faster model/GPU")
    return max(ok, key=lambda p: p.requests_s)


def replicas_for(target_rps: float, capacity_rps: float) -> int:
    return max(1, math.ceil(target_rps / capacity_rps - 1e-9))


def p95_at(points: list[Point], load_rps: float) -> float:
    """p95 at a per-replica load, interpolated along the measured curve; beyond the highest measured
    rate the replica is saturated (queues grow): infinite."""
    pts = sorted(points, key=lambda p: p.requests_s)
    if load_rps <= pts[0].requests_s:
        return pts[0].p95_ms
    for lo, hi in zip(pts, pts[1:], strict=False):
        if load_rps <= hi.requests_s:
            frac = (load_rps - lo.requests_s) / (hi.requests_s - lo.requests_s)
            return lo.p95_ms + frac * (hi.p95_ms - lo.p95_ms)
    return math.inf


def _hours(text: str) -> float:
    """A time as hours: HH:MM[:SS] clock times, ISO datetimes, or plain numbers (seconds)."""
    text = text.strip()
    try:
        return float(text) / 3600
    except ValueError:
        pass
    if ":" in text and "-" not in text:
        parts = [float(x) for x in text.split(":")]
        return parts[0] + parts[1] / 60 + (parts[2] / 3600 if len(parts) > 2 else 0)
    return datetime.fromisoformat(text).timestamp() / 3600


def load_trace(path: Path) -> list[tuple[str, float, float]]:
    """(time label, requests/s, interval hours) per row of a CSV with header `time,requests_per_s`.
    A row lasts until the next row's time; the last row lasts as long as the one before it (1 h alone)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
            header = [h.strip().lower() for h in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"--load-trace {path}: cannot read ({exc})") from None
    time_col = next((c for c in TIME_COLUMNS if c in header), None)
    rate_col = next((c for c in RATE_COLUMNS if c in header), None)
    if not rows or time_col is None or rate_col is None:
        raise UsageError(f"--load-trace {path}: need a header 'time,requests_per_s' and at least one row")
    rows = [{k.strip().lower(): (v or "") for k, v in r.items() if k} for r in rows]
    try:
        times = [_hours(r[time_col]) for r in rows]
        rates = [float(r[rate_col]) for r in rows]
    except (ValueError, IndexError) as exc:
        raise UsageError(f"--load-trace {path}: bad value ({exc})") from None
    if any(r < 0 or not math.isfinite(r) for r in rates):
        raise UsageError(f"--load-trace {path}: requests_per_s must be >= 0")
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    if any(s <= 0 for s in steps):
        raise UsageError(f"--load-trace {path}: times must increase")
    steps.append(steps[-1] if steps else 1.0)
    return [(r[time_col].strip(), rate, hours) for r, rate, hours in zip(rows, rates, steps, strict=True)]


def replay(trace: list[tuple[str, float, float]], points: list[Point], slo_ms: float, capacity_rps: float,
           hourly_usd: float, min_replicas: int = 1, max_replicas: int = 10) -> dict:
    """The seed's policy, one decision per trace row: the replicas serving a row are those the
    previous row's decision left; scale up one when p95 > SLO and utilization > 80%, down one when
    utilization < 30%, within [min, max]."""
    replicas, rows = min_replicas, []
    for label, rps, hours in trace:
        utilization = rps / (replicas * capacity_rps)
        p95 = p95_at(points, rps / replicas)
        rows.append({"time": label, "requests_s": rps, "replicas": replicas, "utilization": utilization,
                     "p95_ms": p95 if math.isfinite(p95) else None, "slo_met": p95 <= slo_ms,
                     "cost_usd": replicas * hourly_usd * hours, "hours": hours})
        if p95 > slo_ms and utilization > SCALE_UP_UTILIZATION:
            replicas += 1
        elif utilization < SCALE_DOWN_UTILIZATION:
            replicas -= 1
        replicas = min(max(replicas, min_replicas), max_replicas)
    return {"rows": rows, "total_cost_usd": sum(r["cost_usd"] for r in rows),
            "replica_hours": sum(r["replicas"] * r["hours"] for r in rows),
            "peak_replicas": max(r["replicas"] for r in rows),
            "intervals_over_slo": sum(not r["slo_met"] for r in rows)}


def check_plot_path(path: Path) -> None:
    """Before any work: a place `plot` may write, where an existing file is replaced only if it is a PNG
    (so `--plot trace.csv` cannot overwrite the load trace)."""
    check_out_file(Path(path), "--plot", "a PNG image", _is_png)


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def plot(rows: list[dict], path: Path) -> None:
    """Replicas (steps) and load (line) over the trace, as a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = [sum(r["hours"] for r in rows[:i]) for i in range(len(rows) + 1)]  # hours since the first row
    fig, ax = plt.subplots(figsize=(8, 3.5))
    (steps,) = ax.step(x, [r["replicas"] for r in rows] + [rows[-1]["replicas"]], where="post", color="tab:blue",
                       label="replicas")
    ax.set_ylabel("replicas")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(r["replicas"] for r in rows) + 1)
    ax.set_xticks(x[:-1], [r["time"] for r in rows], rotation=45, fontsize=7)
    load = ax.twinx()
    (line,) = load.plot(x[:-1], [r["requests_s"] for r in rows], color="tab:orange", marker=".", label="requests/s")
    load.set_ylabel("requests/s")
    load.set_ylim(bottom=0)
    ax.legend(handles=[steps, line], loc="upper left", fontsize=8)
    ax.set_title("autoscaling replay")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"--plot {path}: cannot write ({exc.strerror})") from None
    finally:
        plt.close(fig)
