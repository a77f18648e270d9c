"""The article's first table, from measurements: one row per method (the source first) built from the
profile reports of each artifact against its source (`access.ProfileView`), plus what each method is
best for and which one the objective picks. Pure functions: nothing is measured here."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from optcli.compare.access import ProfileView
from optcli.roi.cost import cost_per_1k

# where each speedup figure sits in a profile report (artifact/source ratio rows of `comparison`)
SPEEDUPS = {
    "batch1": "throughput.decode_tok_s",  # batch-1 decode tokens/s: the single-user latency
    "load": "throughput.online_output_tok_s",  # output tokens/s at the workload's load level (online)
    "offline": "throughput.output_tok_s",  # every request at once
}
E2E_P50 = "latency_ms.e2e.p50"
TOTAL_TOK_S = "throughput.total_tok_s"
OBJECTIVES = ("cost", "latency", "throughput", "memory")
PEAK_WHY_CPU = ("not measurable on a CPU: both models share one process, so its peak RSS holds both "
                "(the artifact's own peak is in its profile report)")


def parameter_count(model_dir: Path) -> int:
    """Parameters of a dense checkpoint from its safetensors headers (embeddings and head included)."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                total += n
    return total


def weight_file_bytes(model_dir: Path) -> int:
    """Bytes of every weight file of a checkpoint: what it costs to store and load, scales and zeros included."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def bits_per_weight(model_dir: Path, parameters: int) -> float | None:
    nbytes = weight_file_bytes(model_dir)
    return 8 * nbytes / parameters if parameters and nbytes else None


def _interval(ratio: dict) -> dict:
    return {k: ratio.get(k) for k in ("ratio", "ci_low", "ci_high", "verdict")}


def _reduction(artifact: float | None, source: float | None) -> float | None:
    return 1 - artifact / source if artifact is not None and source else None


def source_row(source_dir: Path, parameters: int, view: ProfileView | None, gpu_hour_cost: float | None,
               device: str) -> dict:
    """The source as every artifact's reference: ratios 1 by definition, its own figures as measured in the
    first artifact's run (`view`, None when no artifact was measured)."""
    one = {"ratio": 1.0, "ci_low": None, "ci_high": None, "verdict": None}
    baseline = (lambda p: view.baseline_figure(p)) if view is not None else (lambda p: None)
    cost = cost_per_1k(gpu_hour_cost, baseline(TOTAL_TOK_S), baseline("throughput.output_tok_s"))
    return {
        "method": "source",
        "artifact": str(source_dir),
        "bits_per_weight": bits_per_weight(source_dir, parameters),
        "accuracy": {"ppl": view.accuracy()["baseline_ppl"] if view else None, "ppl_change": 0.0,
                     "kld_mean": 0.0, "kld_p99": 0.0, "top1_agreement": 1.0, "tasks": None,
                     "note": "the reference every artifact is scored against"},
        "speedup": {name: dict(one) for name in SPEEDUPS},
        "e2e_p50_ratio": dict(one),
        "memory_reduction": {"weights": 0.0, "peak": None if device == "cpu" else 0.0,
                             "weights_bytes": baseline("memory.weights_bytes"),
                             "peak_bytes": baseline("memory.peak_bytes"),
                             "file_bytes": weight_file_bytes(source_dir)},
        "usd_per_1k_tokens": cost["usd_per_1k_tokens"],
        "best_for": [],
        "kpi": None,
        "figures": {"decode_tok_s": baseline("throughput.decode_tok_s"),
                    "online_output_tok_s": baseline("throughput.online_output_tok_s"),
                    "output_tok_s": baseline("throughput.output_tok_s")},
    }


def artifact_row(recipe: str, artifact: Path, parameters: int, view: ProfileView, device: str,
                 with_kpi: bool) -> dict:
    acc = view.accuracy()
    ppl_ratio = acc["ppl_ratio"]
    peak = _reduction(view.figure("memory.peak_bytes"), view.baseline_figure("memory.peak_bytes"))
    kpi = view.kpi() if with_kpi else None
    return {
        "method": recipe,
        "artifact": str(artifact),
        "bits_per_weight": bits_per_weight(artifact, parameters),
        "accuracy": {"ppl": acc["ppl"], "ppl_change": ppl_ratio - 1 if ppl_ratio is not None else None,
                     "kld_mean": acc["kld_mean"], "kld_p99": acc["kld_p99"],
                     "top1_agreement": acc["top1_agreement"], "tasks": acc["tasks"]},
        "speedup": {name: _interval(view.ratio(field)) for name, field in SPEEDUPS.items()},
        "e2e_p50_ratio": _interval(view.ratio(E2E_P50)),
        "memory_reduction": {
            "weights": _reduction(view.figure("memory.weights_bytes"), view.baseline_figure("memory.weights_bytes")),
            "peak": peak, **({"peak_why": PEAK_WHY_CPU} if peak is None and device == "cpu" else {}),
            "weights_bytes": view.figure("memory.weights_bytes"), "peak_bytes": view.figure("memory.peak_bytes"),
            "file_bytes": weight_file_bytes(artifact)},
        "usd_per_1k_tokens": view.figure("cost.usd_per_1k_tokens"),
        "best_for": [],
        "kpi": None if kpi is None else {
            "passed": kpi["passed"], "checks": kpi["checks"],
            "failing": [c for c in kpi["checks"] if not c.get("passed")]},
        "figures": {"decode_tok_s": view.figure("throughput.decode_tok_s"),
                    "online_output_tok_s": view.figure("throughput.online_output_tok_s"),
                    "output_tok_s": view.figure("throughput.output_tok_s")},
    }


def _value(row: dict, what: str) -> float | None:
    if what == "batch1":
        return row["speedup"]["batch1"]["ratio"]
    if what == "load":
        return row["speedup"]["load"]["ratio"]
    if what == "memory":
        return row["memory_reduction"]["file_bytes"]
    if what == "kld":
        return row["accuracy"]["kld_mean"]
    if what == "cost":
        return row["usd_per_1k_tokens"]
    raise ValueError(what)


def _winner(rows: list[dict], what: str, highest: bool) -> dict | None:
    scored = [(r, _value(r, what)) for r in rows]
    scored = [(r, v) for r, v in scored if v is not None]
    if not scored:
        return None
    return (max if highest else min)(scored, key=lambda item: item[1])[0]


def _speed_pool(rows: list[dict], what: str) -> list[dict]:
    """Who may claim a speed: an artifact whose ratio's interval lies above 1 (measurably faster than the
    source; a ratio without an interval counts as measured), or the source when every artifact is
    measurably slower. A median inside the noise claims nothing."""
    def low(r: dict) -> float | None:
        return r["speedup"][what].get("ci_low")

    def high(r: dict) -> float | None:
        return r["speedup"][what].get("ci_high")

    faster = [r for r in rows[1:] if low(r) is None or low(r) > 1.0]
    if faster:
        return faster
    return rows[:1] if all(high(r) is not None and high(r) < 1.0 for r in rows[1:]) else []


def assign_best_for(rows: list[dict]) -> None:
    """Each method's strengths, from the measured figures (the source competes on speed and size; accuracy
    is its by definition, so "most accurate" goes to the closest artifact)."""
    claims = (("lowest batch-1 latency", _speed_pool(rows, "batch1"), "batch1", True),
              ("highest throughput at load", _speed_pool(rows, "load"), "load", True),
              ("smallest memory", rows, "memory", False), ("most accurate", rows[1:], "kld", False),
              ("lowest cost per token", rows, "cost", False))
    for label, pool, what, highest in claims:
        winner = _winner(pool, what, highest)
        if winner is None:
            continue
        tied = _tied(pool, winner, what) if what in ("batch1", "load") else []
        for row in [winner, *tied]:
            row["best_for"].append(f"{label} (tied within intervals)" if tied else label)
    rows[0]["best_for"].insert(0, "reference (exact accuracy)")


def _tied(pool: list[dict], winner: dict, what: str) -> list[dict]:
    """The other rows whose speed interval reaches the winner's: the data cannot order them, so the claim
    is theirs too (and the label says so), instead of going to whichever median came out on top this run."""
    low = winner["speedup"][what].get("ci_low")
    if low is None:
        return []
    return [r for r in pool if r is not winner and (r["speedup"][what].get("ci_high") or 0) >= low]


def objective_score(row: dict, objective: str) -> float | None:
    """Higher is better: throughput at load, 1 / E2E p50 at load, smaller files, lower cost per token (with a
    price) or, without one, higher total throughput (cost per token at a fixed price is 1 / throughput)."""
    if objective == "throughput":
        return row["speedup"]["load"]["ratio"]
    if objective == "latency":
        r = row["e2e_p50_ratio"]["ratio"]
        return 1 / r if r else None
    if objective == "memory":
        b = row["memory_reduction"]["file_bytes"]
        return -b if b is not None else None
    if row["usd_per_1k_tokens"] is not None:
        return -row["usd_per_1k_tokens"]
    return row["speedup"]["offline"]["ratio"]


def choose_best(rows: list[dict], objective: str) -> dict | None:
    """The candidate (never the source) with the best objective among those passing every gate (all of them
    without a KPI file); None when none passes."""
    eligible = [r for r in rows[1:] if r["kpi"] is None or r["kpi"]["passed"]]
    scored = [(r, objective_score(r, objective)) for r in eligible]
    scored = [(r, s) for r, s in scored if s is not None]
    return max(scored, key=lambda item: item[1])[0] if scored else None
