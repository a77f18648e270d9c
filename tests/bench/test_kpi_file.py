"""The article's whole KPI file: validated (its production keys too), and what `profile` does with each key."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from optcli.bench.kpi import load_kpi
from optcli.bench.kpi_scope import latency_windows, profile_scope, window_checks
from optcli.bench.metrics import RequestTiming
from optcli.errors import UsageError

OPTCLI = str(Path(sys.executable).parent / "optcli")
ARTICLE = """\
latency:    {p95_threshold: 2000, p99_threshold: 3000, alert_window: 300}
throughput: {minimum: 100, degradation_threshold: 0.8}
cost:       {increase_threshold: 1.2, budget_alert: 0.9}
accuracy:   {acceptable_drop: 0.02, eval_frequency: 1000}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kpi.yaml"
    path.write_text(text)
    return path


def test_the_articles_file_loads_and_each_key_is_applied_or_production_only(tmp_path: Path) -> None:
    kpi = load_kpi(_write(tmp_path, ARTICLE))
    assert (kpi.latency.alert_window, kpi.cost.budget_alert, kpi.accuracy.eval_frequency) == (300, 0.9, 1000)
    scope = profile_scope(kpi)
    assert scope["applied"] == ["latency.p95_threshold", "latency.p99_threshold", "latency.alert_window",
                                "throughput.minimum", "throughput.degradation_threshold", "cost.increase_threshold",
                                "accuracy.acceptable_drop"]
    assert [p["key"] for p in scope["production_only"]] == ["cost.budget_alert", "accuracy.eval_frequency"]


@pytest.mark.parametrize(("text", "field"), [
    ("latency: {alert_window: 0}", "latency.alert_window"),
    ("cost: {budget_alert: 1.5}", "cost.budget_alert"),
    ("accuracy: {eval_frequency: 0.5}", "accuracy.eval_frequency"),
    ("accuracy: {eval_frequency: true}", "accuracy.eval_frequency"),
    ("latency: {alert_windw: 300}", "latency.alert_windw"),
])
def test_a_bad_production_key_is_one_clear_error(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(UsageError, match=f"'{field}'"):
        load_kpi(_write(tmp_path, text))


def _timing(start: float, e2e: float) -> RequestTiming:
    return RequestTiming(start=start, first_token=start + e2e / 2, token_times=[(start + e2e / 2, 1), (start + e2e, 1)],
                         end=start + e2e, prompt_tokens=4, output_tokens=2)


def test_alert_window_takes_the_worst_windows_percentiles() -> None:
    # 10 s of fast requests, then 10 s of slow ones: the whole run's p95 hides what the second window shows
    timings = [_timing(t * 0.5, 0.1) for t in range(20)] + [_timing(10 + t * 0.5, 1.0) for t in range(20)]
    w = latency_windows({"timings": timings, "measured": (0, len(timings))}, "e2e", 10.0)
    assert [x["requests"] for x in w["windows"]] == [20, 18, 2]  # by completion time (the last two end after 20 s)
    assert w["windows"][0]["p95"] == pytest.approx(100) and w["worst"]["p95"] == pytest.approx(1000)
    kpi = load_kpi_text("latency: {p95_threshold: 500, alert_window: 10}")
    (check,) = window_checks(kpi, w)
    assert check["passed"] is False and check["value"] == pytest.approx(1000) and "worst 10 s window" in check["name"]
    one = latency_windows({"timings": timings, "measured": (0, 20)}, "e2e", 300.0)
    assert len(one["windows"]) == 1 and "shorter than one window" in one["note"]


def load_kpi_text(text: str):
    with tempfile.TemporaryDirectory() as d:
        return load_kpi(_write(Path(d), text))


def test_profile_accepts_the_articles_file_and_says_which_keys_it_applied(stories_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = subprocess.run([OPTCLI, "profile", str(stories_dir), "--baseline", str(stories_dir), "--requests", "4",
                             "--prompt-len", "8:16", "--output-len", "6", "--concurrency", "2",
                             "--kpi", str(_write(tmp_path, ARTICLE)), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    # accepted (not exit 2); whether a relative throughput gate passes depends on the machine's load
    assert result.returncode in (0, 3), result.stderr
    kpi = json.loads((out / "report.json").read_text())["kpi"]
    assert "latency.alert_window" in kpi["applied"]
    assert [p["key"] for p in kpi["production_only"]] == ["cost.budget_alert", "accuracy.eval_frequency"]
    assert kpi["windows"]["window_s"] == 300 and kpi["windows"]["windows"][0]["requests"] == 4
    windowed = [c for c in kpi["checks"] if c["name"].endswith("(latency.alert_window)")]
    assert len(windowed) == 2 and all(c["value"] > 0 for c in windowed)
    assert "KPI cost.budget_alert: recorded, not applied (production-only" in result.stdout
    for name in ("report.md", "report.html"):
        text = (out / name).read_text()
        assert "Recorded, not applied (production-only" in text and "accuracy.eval_frequency" in text
        assert "alert_window 300 s: 1 window(s) of e2e latency" in text
