"""The decision part of the methods table, on hand-made rows: the Pareto front, what each method is best
for, and which candidate the objective picks among those that pass (never the source)."""

from __future__ import annotations

from optcli.compare.render import pareto_front
from optcli.compare.table import assign_best_for, choose_best


def row(method: str, load: float, batch1: float, kld: float, file_bytes: int, usd: float | None = None,
        passed: bool | None = None, e2e: float = 1.0) -> dict:
    def ratio(value: float) -> dict:
        return {"ratio": value, "ci_low": None, "ci_high": None}

    return {"method": method, "speedup": {"load": ratio(load), "batch1": ratio(batch1), "offline": ratio(load)},
            "e2e_p50_ratio": ratio(e2e), "accuracy": {"kld_mean": kld},
            "memory_reduction": {"file_bytes": file_bytes}, "usd_per_1k_tokens": usd, "best_for": [],
            "kpi": None if passed is None else {"passed": passed}}


def test_pareto_front_keeps_only_the_undominated() -> None:
    points = [("source", 1.0, 1.0), ("fast", 1.6, 0.9), ("dominated", 1.2, 0.85), ("both", 1.6, 0.95)]
    assert pareto_front(points) == {"source", "both"}


def test_best_for_is_derived_from_the_figures() -> None:
    rows = [row("source", 1.0, 1.0, 0.0, 100), row("a", 1.5, 0.9, 0.02, 40), row("b", 0.9, 1.3, 0.01, 30)]
    assign_best_for(rows)
    assert rows[0]["best_for"] == ["reference (exact accuracy)"]
    assert rows[1]["best_for"] == ["highest throughput at load"]
    assert rows[2]["best_for"] == ["lowest batch-1 latency", "smallest memory", "most accurate"]


def test_a_speed_inside_the_noise_claims_nothing() -> None:
    rows = [row("source", 1.0, 1.0, 0.0, 100), row("a", 1.5, 1.08, 0.02, 40), row("b", 1.2, 1.05, 0.01, 30)]
    rows[0]["speedup"]["batch1"] = {"ratio": 1.0, "ci_low": None, "ci_high": None}
    rows[1]["speedup"]["batch1"].update(ci_low=0.35, ci_high=3.54)  # the highest median, but not measurably faster
    rows[2]["speedup"]["batch1"].update(ci_low=1.04, ci_high=1.07)
    rows[1]["speedup"]["load"].update(ci_low=0.9, ci_high=2.0)
    rows[2]["speedup"]["load"].update(ci_low=0.8, ci_high=1.1)
    assign_best_for(rows)
    assert rows[2]["best_for"][0] == "lowest batch-1 latency" and not any("batch-1" in c for c in rows[1]["best_for"])
    assert not any("highest throughput at load" in r["best_for"] for r in rows)  # nobody measurably faster
    for r in rows[1:]:
        r["speedup"]["load"].update(ci_low=0.5, ci_high=0.8)
        r["best_for"] = []
    rows[0]["best_for"] = []
    assign_best_for(rows)
    assert "highest throughput at load" in rows[0]["best_for"]  # every artifact measurably slower


def test_speeds_the_intervals_cannot_order_share_the_claim() -> None:
    rows = [row("source", 1.0, 1.0, 0.0, 100), row("a", 1.2, 1.07, 0.02, 40), row("b", 1.2, 1.05, 0.01, 30),
            row("c", 1.2, 1.03, 0.03, 50)]
    for r, (lo, hi) in zip(rows[1:], [(1.05, 1.07), (1.02, 1.10), (1.01, 1.04)], strict=True):
        r["speedup"]["batch1"].update(ci_low=lo, ci_high=hi)
    assign_best_for(rows)
    tied = "lowest batch-1 latency (tied within intervals)"
    assert tied in rows[1]["best_for"] and tied in rows[2]["best_for"]  # b's interval reaches a's
    assert not any("batch-1" in c for c in rows[3]["best_for"])  # c's tops out below a's lower bound


def test_the_objective_picks_among_passers_only() -> None:
    rows = [row("source", 1.0, 1.0, 0.0, 100, passed=None), row("a", 1.5, 0.9, 0.02, 40, usd=0.2, passed=False),
            row("b", 0.9, 1.3, 0.01, 30, usd=0.3, passed=True), row("c", 1.2, 1.0, 0.03, 50, usd=0.1, passed=True)]
    assert choose_best(rows, "throughput")["method"] == "c"
    assert choose_best(rows, "memory")["method"] == "b"
    assert choose_best(rows, "cost")["method"] == "c"
    for r in rows[1:]:
        r["kpi"]["passed"] = False
    assert choose_best(rows, "cost") is None
