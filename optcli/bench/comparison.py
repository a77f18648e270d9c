"""The artifact against its source, side by side: one row per figure with the artifact/source ratio, its
95% interval over the interleaved repeats and a verdict (`stats.py`), a warning wherever the artifact is
measurably slower, notes where offline throughput fell below online, and the batch-1 decode roofline
(weight-read bandwidth as a share of the machine's peak). Pure functions of finished measurements:
nothing is measured here."""

from __future__ import annotations

from optcli.bench.stats import SLOWER, median_interval, ratio_interval, verdict
from optcli.bench.workload import DECODE_NEW_TOKENS, DECODE_PROMPT_TOKENS, Workload
from optcli.report.markdown import fmt_interval
from optcli.schema.report import Figures, ProfileReport

# (label, field in the report and in comparison.baseline, higher is better, where the figure was measured)
COMPARISON_ROWS = (
    ("output tok/s (offline)", "throughput.output_tok_s", True, "offline"),
    ("output tok/s (online)", "throughput.online_output_tok_s", True, "online"),
    ("total tok/s (offline)", "throughput.total_tok_s", True, "offline"),
    ("decode tok/s (batch 1)", "throughput.decode_tok_s", True, "batch1"),
    ("prompt tok/s (batch 1)", "throughput.prompt_tok_s", True, "batch1"),
    ("TTFT p50 (ms)", "latency_ms.ttft.p50", False, "online"),
    ("TTFT p95 (ms)", "latency_ms.ttft.p95", False, "online"),
    ("TTFT p99 (ms)", "latency_ms.ttft.p99", False, "online"),
    ("TPOT p50 (ms)", "latency_ms.tpot.p50", False, "online"),
    ("TPOT p95 (ms)", "latency_ms.tpot.p95", False, "online"),
    ("TPOT p99 (ms)", "latency_ms.tpot.p99", False, "online"),
    ("E2E p50 (ms)", "latency_ms.e2e.p50", False, "online"),
    ("E2E p95 (ms)", "latency_ms.e2e.p95", False, "online"),
    ("E2E p99 (ms)", "latency_ms.e2e.p99", False, "online"),
    ("weights (bytes)", "memory.weights_bytes", False, "load"),
)


def _ratio(artifact: float | None, baseline: float | None) -> float | None:
    """artifact / baseline; None when either is unmeasured or the baseline is 0."""
    if artifact is None or baseline is None or baseline == 0:
        return None
    return artifact / baseline


def _where(kind: str, workload: Workload) -> str:
    """Which measurement a figure came from, in the words of a warning."""
    if kind == "offline":
        return f"at {workload.requests} requests (offline)"
    if kind == "batch1":
        return "at batch 1"
    return f"at {workload.headline().label} ({workload.requests} requests, online)"


def comparison(report: ProfileReport | dict, baseline: Figures | dict, workload: Workload,
               runs: dict[str, list[dict]] | None = None) -> dict:
    """The source's figures (`baseline`), one row per figure of both (`field` is where the figure sits in
    the report and in `baseline`), and a warning per throughput figure where the artifact is slower.

    `runs` ({"value": [...], "baseline": [...]}: each repeat's figures by field, the artifact's and the
    source's, paired by repeat): each row gets the median ratio of the pairs with its 95% interval, each
    model's interval, and a verdict; a warning needs the verdict `slower`. Without `runs` (one measurement
    of each) the ratio is artifact / baseline, with no interval and no verdict, and any ratio below 1 warns."""
    report, baseline = ProfileReport.coerce(report), Figures.model_validate(baseline)
    rows, warnings = [], []
    name = report.recipe or report.model
    for label, field, higher, kind in COMPARISON_ROWS:
        b, a = baseline.at(field), report.at(field)
        row = {"metric": label, "field": field, "baseline": b, "value": a, "artifact": a, "ratio": _ratio(a, b),
               "ci_low": None, "ci_high": None, "repeats": None, "verdict": None, "higher_is_better": higher}
        mine = [run.get(field) for run in runs["value"]] if runs else []
        theirs = [run.get(field) for run in runs["baseline"]] if runs else []
        if kind != "load" and any(v is not None for v in mine):
            interval = ratio_interval(mine, theirs)
            row["repeats"] = len(mine)
            if interval is not None:
                row.update(ratio=interval.median, ci_low=interval.low, ci_high=interval.high,
                           verdict=verdict(interval, higher))
            for key, values in (("value", mine), ("baseline", theirs)):
                own = median_interval(values)
                row[f"{key}_ci_low"], row[f"{key}_ci_high"] = (own.low, own.high) if own else (None, None)
            row["runs"] = {"value": mine, "baseline": theirs}
        rows.append(row)
        r = row["ratio"]
        slower = row["verdict"] == SLOWER if row["ci_low"] is not None else r is not None and r < 1
        if higher and slower:
            what = label.split(" (")[0]
            warnings.append(f"{name}: {fmt_interval(row)} its source's {what} {_where(kind, workload)}")
    figures = baseline.to_dict()
    baseline_figures = {k: figures[k] for k in ("throughput", "latency_ms", "memory")}
    return {"baseline": baseline_figures, "rows": rows, "warnings": warnings,
            "method": "medians of interleaved repeats (ABBA order); ratio: median of the paired per-repeat "
                      "ratios; 95% intervals: Student's t on log values below 6 repeats, the sign-test "
                      "interval for the median from 6 (optcli/bench/stats.py)" if runs else "one measurement each"}


def offline_online_notes(report: ProfileReport | dict, candidate, baseline, workload: Workload) -> list[str]:
    """Offline throughput sends every request at once, so for the same model it should be at least online
    throughput (a subset in flight); where its median is lower, a note says why: the offline batch did not
    fit the KV cache (preemption), the two are within noise (their intervals overlap), or the machine was
    busy; anything else is called what it is, a measurement bug to report."""
    notes = []
    busy = ProfileReport.coerce(report).at("hardware.contention.warning")
    for who, run in (("the artifact", candidate), ("the source", baseline)):
        if run is None:
            continue
        offline = median_interval([r.get("throughput.output_tok_s") for r in run.runs])
        online = median_interval([r.get("throughput.online_output_tok_s") for r in run.runs])
        if offline is None or online is None or offline.median >= online.median:
            continue
        head = (f"offline output tok/s of {who} ({offline.median:,.1f}) is below its online "
                f"({online.median:,.1f}, {workload.headline().label})")
        if run.offline_preemptions:
            why = (f"the KV cache could not hold all {workload.requests} requests at once, so offline preempted "
                   f"and recomputed {run.offline_preemptions} sequences over its repeats")
        elif offline.high is not None and online.low is not None and offline.high >= online.low:
            why = "within measurement noise: their 95% intervals overlap"
        elif busy:
            why = f"the machine was busy ({busy.split(' during')[0]})"
        else:
            why = "no preemption, noise or contention explains it: a measurement bug, please report it"
        notes.append(f"{head}: {why}")
    return notes


def roofline(peak: dict, report: ProfileReport | dict, baseline: Figures | dict | None) -> dict:
    """Batch-1 decode reads every weight once per token, so weights_bytes x decode tok/s is the weight-read
    bandwidth it achieved; its share of the machine's peak says how far decode is from memory-bound."""
    gbs = peak["gbs"]

    def side(figures: Figures) -> dict:
        decode_tok_s, weights_bytes = figures.throughput.decode_tok_s, figures.memory.weights_bytes
        achieved = decode_tok_s * weights_bytes / 1e9 if decode_tok_s and weights_bytes else None
        return {"decode_tok_s": decode_tok_s, "weights_bytes": weights_bytes, "achieved_gbs": achieved,
                "share_of_peak": achieved / gbs if achieved is not None and gbs else None}

    return {
        "peak_bandwidth_gbs": gbs,
        "peak_source": peak["source"],
        "method": f"batch 1, {DECODE_PROMPT_TOKENS}-token prompt, {DECODE_NEW_TOKENS} new tokens (ignore_eos) after "
                  "a warm-up; decode tok/s = tokens after the first / seconds after the first",
        "artifact": side(ProfileReport.coerce(report)),
        "baseline": side(Figures.model_validate(baseline)) if baseline is not None else None,
    }
