"""The artifact against its source, side by side: one row per figure with artifact/source ratios, a
warning wherever the artifact is slower, and the batch-1 decode roofline (weight-read bandwidth as a
share of the machine's peak). Pure functions of two finished reports: nothing is measured here."""

from __future__ import annotations

from optcli.bench.workload import DECODE_NEW_TOKENS, DECODE_PROMPT_TOKENS, Workload
from optcli.report.markdown import fmt_ratio

# (label, field in the report and in comparison.baseline, higher is better, where the figure was measured)
COMPARISON_ROWS = (
    ("output tok/s (offline)", "throughput.output_tok_s", True, "offline"),
    ("output tok/s (online)", "throughput.online_output_tok_s", True, "online"),
    ("total tok/s (offline)", "throughput.total_tok_s", True, "offline"),
    ("decode tok/s (batch 1)", "throughput.decode_tok_s", True, "batch1"),
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


def _at(node, field: str):
    for key in field.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


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


def comparison(report: dict, baseline: dict, workload: Workload) -> dict:
    """The source's figures (`baseline`), one row per figure of both with artifact/baseline ratios (`field`
    is where the figure sits in the report and in `baseline`), and a warning per throughput figure where
    the artifact is slower than its source."""
    rows, warnings = [], []
    name = report.get("recipe") or report["model"]
    for label, field, higher, kind in COMPARISON_ROWS:
        b, a = _at(baseline, field), _at(report, field)
        r = _ratio(a, b)
        rows.append({"metric": label, "field": field, "baseline": b, "artifact": a, "ratio": r,
                     "higher_is_better": higher})
        if higher and r is not None and r < 1:
            what = label.split(" (")[0]
            warnings.append(f"{name}: {fmt_ratio(r)} its source's {what} {_where(kind, workload)}")
    baseline_figures = {k: baseline[k] for k in ("throughput", "latency_ms", "memory")}
    return {"baseline": baseline_figures, "rows": rows, "warnings": warnings}


def roofline(peak: dict, report: dict, baseline: dict | None) -> dict:
    """Batch-1 decode reads every weight once per token, so weights_bytes x decode tok/s is the weight-read
    bandwidth it achieved; its share of the machine's peak says how far decode is from memory-bound."""
    gbs = peak["gbs"]

    def side(figures: dict) -> dict:
        decode_tok_s, weights_bytes = figures["throughput"]["decode_tok_s"], figures["memory"]["weights_bytes"]
        achieved = decode_tok_s * weights_bytes / 1e9 if decode_tok_s and weights_bytes else None
        return {"decode_tok_s": decode_tok_s, "weights_bytes": weights_bytes, "achieved_gbs": achieved,
                "share_of_peak": achieved / gbs if achieved is not None and gbs else None}

    return {
        "peak_bandwidth_gbs": gbs,
        "peak_source": peak["source"],
        "method": f"batch 1, {DECODE_PROMPT_TOKENS}-token prompt, {DECODE_NEW_TOKENS} new tokens (ignore_eos) after "
                  "a warm-up; decode tok/s = tokens after the first / seconds after the first",
        "artifact": side(report),
        "baseline": side(baseline) if baseline is not None else None,
    }
