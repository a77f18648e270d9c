"""The live KPI watcher on a fake clock: sliding window, busy-time throughput, one log line per breach and per
recovery, the budget share, and which of a KPI file's keys it watches."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from optcli.bench.kpi import load_kpi
from optcli.kpi.live import from_kpi
from optcli.serve.kpi_watch import KpiWatcher


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _live(tmp_path: Path, text: str):
    path = tmp_path / "kpi.yaml"
    path.write_text(text)
    return from_kpi(load_kpi(path))


def test_a_breach_and_its_recovery_are_logged_once_each(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    live = _live(tmp_path, "latency: {p95_threshold: 100, alert_window: 10}\nthroughput: {minimum: 50}\n")
    clock, registry = Clock(), CollectorRegistry()
    watcher = KpiWatcher(live, registry, "m", clock=clock)
    caplog.set_level(logging.WARNING, logger="optcli.serve")
    for _ in range(20):  # 20 requests of 0.5 s back to back, 10 tokens each: 20 tok/s while busy
        watcher.finished(clock.t - 0.5, clock.t, 0.1, 10)
        clock.t += 0.5
    for _ in range(3):
        rows = {r["kpi"]: r for r in watcher.evaluate()}
    assert rows["latency_e2e_p95_ms"]["value"] == pytest.approx(500) and rows["latency_e2e_p95_ms"]["breached"]
    assert rows["throughput_output_tok_s"]["value"] == pytest.approx(20) and rows["throughput_output_tok_s"]["breached"]
    text = generate_latest(registry).decode()
    assert 'optcli:kpi_breached{kpi="latency_e2e_p95_ms",model_name="m"} 1.0' in text
    assert 'optcli:kpi_threshold{kpi="throughput_output_tok_s",model_name="m"} 50.0' in text
    clock.t += 11  # the window empties: no traffic is no breach
    for _ in range(3):
        rows = {r["kpi"]: r for r in watcher.evaluate()}
    assert rows["latency_e2e_p95_ms"]["value"] is None and not rows["latency_e2e_p95_ms"]["breached"]
    lines = [r.getMessage() for r in caplog.records]
    assert sum("latency_e2e_p95_ms breached" in m for m in lines) == 1
    assert sum("latency_e2e_p95_ms recovered" in m for m in lines) == 1
    assert sum("throughput_output_tok_s breached" in m for m in lines) == 1


def test_idle_gaps_do_not_count_against_throughput(tmp_path: Path) -> None:
    live = _live(tmp_path, "throughput: {minimum: 50}\nlatency: {alert_window: 60}\n")
    clock = Clock()
    watcher = KpiWatcher(live, CollectorRegistry(), "m", clock=clock)
    watcher.finished(clock.t - 1, clock.t, 0.1, 100)  # 100 tokens in 1 s, then 30 s idle, then the same again
    clock.t += 30
    watcher.finished(clock.t - 1, clock.t, 0.1, 100)
    assert watcher.figures()["throughput_output_tok_s"] == pytest.approx(100)


def test_budget_share_is_this_process_spend_over_the_monthly_budget(tmp_path: Path) -> None:
    live = _live(tmp_path, "cost: {budget_alert: 0.5}\n")
    wall = [1_800_000_000.0]  # mid-month (UTC): the process started after the month began
    watcher = KpiWatcher(live, CollectorRegistry(), "m", gpu_hour_cost=10, monthly_budget=100, wall=lambda: wall[0])
    wall[0] += 4 * 3600  # 4 h at 10 USD/h = 40 USD of 100
    assert watcher.figures()["cost_budget_share"] == pytest.approx(0.4)
    wall[0] += 3600
    (row,) = watcher.evaluate()
    assert row["value"] == pytest.approx(0.5) and row["breached"]  # alert at the share, not past it


def test_the_articles_file_as_live_gates(tmp_path: Path) -> None:
    live = _live(tmp_path, "latency: {p95_threshold: 2000, p99_threshold: 3000, alert_window: 300}\n"
                           "throughput: {minimum: 100, degradation_threshold: 0.8}\n"
                           "cost: {increase_threshold: 1.2, budget_alert: 0.9}\n"
                           "accuracy: {acceptable_drop: 0.02, eval_frequency: 1000}\nmax_kld_mean: 0.05\n")
    assert [g.name for g in live.gates] == ["latency_e2e_p95_ms", "latency_e2e_p99_ms", "throughput_output_tok_s",
                                            "throughput_vs_baseline", "cost_vs_baseline", "cost_budget_share",
                                            "accuracy_ppl_increase"]
    assert (live.window_s, live.eval_frequency) == (300, 1000)
    assert live.needs() == {"baseline_report": ["throughput.degradation_threshold", "cost.increase_threshold"],
                            "gpu_hour_cost": ["cost.budget_alert"], "monthly_budget": ["cost.budget_alert"]}
    assert [k for k, _ in live.not_watched] == ["max_kld_mean"]
