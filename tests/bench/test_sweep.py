"""Load levels in `profile`: GuideLLM's sweep (synchronous, constant rates between, throughput), rate and
concurrency lists, constant vs Poisson arrivals, warm-up / cool-down left out of the statistics,
--max-seconds, per-level SLO attainment and goodput, and the SLO-max-rate that `roi` plans capacity from."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from optcli.bench.load_generator import run_load
from optcli.bench.rates import SYNCHRONOUS, THROUGHPUT, LoadLevel, parse_exclusion, plan_levels, sweep_rates
from optcli.cli import app
from optcli.errors import UsageError

SMALL = ["--requests", "10", "--prompt-len", "8:16", "--output-len", "6", "--json"]


def _profile(*args: str) -> dict:
    result = CliRunner().invoke(app, ["profile", *args, *SMALL])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_cli_names_become_levels() -> None:
    assert plan_levels(None, None, None, 32) == ((LoadLevel("concurrent", concurrency=8),), 0, "poisson")
    assert plan_levels("2", None, None, 32) == ((LoadLevel("poisson", rate=2.0),), 0, "poisson")
    levels, _, arrivals = plan_levels("1,2.5", "constant", "4", 32)
    assert levels == (LoadLevel("constant", 1.0, 4), LoadLevel("constant", 2.5, 4)) and arrivals == "constant"
    assert plan_levels("sweep", None, None, 32) == ((), 10, "constant")
    assert plan_levels("sweep:4", "poisson", None, 32) == ((), 4, "poisson")
    assert plan_levels("6", "sweep", None, 32) == ((), 6, "constant")  # GuideLLM: --rate-type sweep --rate N
    assert plan_levels(None, "synchronous", None, 32)[0] == (SYNCHRONOUS,)
    assert plan_levels(None, "throughput", None, 32)[0] == (THROUGHPUT,)
    assert [lv.concurrency for lv in plan_levels("1,4", "concurrent", None, 32)[0]] == [1, 4]
    assert [lv.concurrency for lv in plan_levels(None, None, "1,4,16", 32)[0]] == [1, 4, 16]
    for bad in [("x", None, None), ("sweep:2", None, None), ("sweep", None, "4"), ("1", "bogus", None),
                (None, "constant", None), ("2", None, "1,2"), ("-1", None, None), ("1", "throughput", None)]:
        with pytest.raises(UsageError):
            plan_levels(*bad, 32)
    assert sweep_rates(2.0, 10.0, 6) == [3.6, 5.2, 6.800000000000001, 8.4]  # strictly between, evenly spaced
    assert sweep_rates(5.0, 4.0, 6) == []  # no room between: the sweep is its two runs
    assert parse_exclusion("3", "--warmup") == 3 and parse_exclusion("0.25", "--warmup") == 0.25
    for bad in ("-1", "1.5", "x"):
        with pytest.raises(UsageError):
            parse_exclusion(bad, "--warmup")


def test_constant_arrivals_keep_their_schedule_and_max_seconds_stops_sending() -> None:
    async def send(prompt, max_tokens):
        await asyncio.sleep(0.01)
        yield 1

    requests = [([1, 2], 1)] * 12
    timings, _ = asyncio.run(run_load(send, requests, rate=50.0, arrivals="constant"))
    starts = [t.start - timings[0].start for t in timings]
    assert all(abs(s - i / 50.0) < 0.015 for i, s in enumerate(starts))  # every 20 ms, no drift
    timings, wall = asyncio.run(run_load(send, [([1], 1)] * 100, rate=40.0, arrivals="constant", max_seconds=0.2))
    assert 6 <= len(timings) <= 9 and wall < 0.5  # 40/s for 0.2 s: 8 sent, the rest never
    timings, _ = asyncio.run(run_load(send, [([1], 1)] * 100, concurrency=2, max_seconds=0.1))
    assert 10 <= len(timings) < 30 and all(t.ok for t in timings)  # the ones waiting for a slot are never sent


def test_a_sweep_reports_every_level_and_the_slo_max_rate(stories_dir: Path, tmp_path: Path) -> None:
    kpi = tmp_path / "kpi.yaml"
    kpi.write_text("p95_e2e_ms_max: 100000\n")  # every level meets it
    report = _profile(str(stories_dir), "--rate", "sweep:5", "--kpi", str(kpi), "--out", str(tmp_path / "r"))
    points = report["throughput"]["sweep"]
    assert [p["mode"] for p in points] == ["synchronous", "constant", "constant", "constant", "throughput"]
    achieved = [p["achieved_rate_requests_s"] for p in points]
    assert achieved == sorted(achieved) and len(set(achieved)) == 5  # rising load, rising achieved rate
    for p in points[1:4]:
        assert abs(p["achieved_rate_requests_s"] / p["rate"] - 1) < 0.25  # the generator kept its target rate
        assert points[0]["requests_s"] < p["rate"] < points[-1]["requests_s"]
    for p in points:
        assert p["slo"]["met"] is True and p["slo"]["attainment"] == 1.0 and p["slo"]["goodput_requests_s"] > 0
        assert p["latency_ms"]["ttft"]["p95"] > 0 and p["requests"]["completed"] == 10 and p["failures"] == []
    best = report["throughput"]["slo_max_rate"]
    assert best["requests_s"] == max(achieved) and best["level"] == "throughput"
    # the headline is the throughput level's median over the repeats; the sweep's points are one curve, the
    # first repeat's (so its throughput point is one of the runs the headline is the median of)
    assert report["workload"]["repeats"]["repeats"] >= 1 and set(report["latency_ms"]) == set(points[-1]["latency_ms"])
    assert report["workload"]["sweep_size"] == 5 and len(report["workload"]["levels"]) == 5
    html = (tmp_path / "r" / "report.html").read_text()
    assert 'alt="latency and goodput vs rate"' in html
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| synchronous |" in md and "| throughput |" in md

    report_path = tmp_path / "r" / "report.json"
    result = CliRunner().invoke(app, ["roi", "--report", str(report_path), "--gpu-hour-cost", "2",
                                      "--target-rps", str(best["requests_s"] * 2.5), "--json"])
    assert result.exit_code == 0, result.output
    capacity = json.loads(result.stdout)["capacity"]
    assert capacity["per_replica_rps"] == best["requests_s"] and capacity["replicas"] == 3
    assert capacity["source"].startswith("report")
    # the chain profile --rate sweep -> roi --autoscale: the scaler's target is the report's requests in flight at
    # the SLO-max-rate (achieved rate x mean E2E latency)
    level = next(p for p in points if p["label"] == best["level"])
    assert best["concurrency"] == pytest.approx(level["achieved_rate_requests_s"] * level["latency_ms"]["e2e"]["mean"] / 1000)
    scaler = tmp_path / "scaler.yaml"
    result = CliRunner().invoke(app, ["roi", "--report", str(report_path), "--gpu-hour-cost", "2", "--autoscale", "keda",
                                      "--out", str(scaler)])
    assert result.exit_code == 0, result.output
    threshold = yaml.safe_load(scaler.read_text())["spec"]["triggers"][0]["metadata"]["threshold"]
    assert float(threshold) == round(best["concurrency"], 3) > 0


def test_a_level_over_the_slo_is_not_the_max_rate(stories_dir: Path, tmp_path: Path) -> None:
    kpi = tmp_path / "kpi.yaml"
    kpi.write_text("p95_ttft_ms_max: 0.001\n")  # no level meets it
    result = CliRunner().invoke(app, ["profile", str(stories_dir), "--rate", "20,40", "--rate-type", "constant",
                                      "--kpi", str(kpi), *SMALL])
    assert result.exit_code == 3  # the gate fails, and the report is still printed
    report = json.loads(result.stdout)
    points = report["throughput"]["sweep"]
    assert [p["label"] for p in points] == ["constant 20 req/s", "constant 40 req/s"]
    assert all(p["slo"]["met"] is False and p["slo"]["attainment"] == 0.0 for p in points)
    assert report["throughput"]["slo_max_rate"] is None and report["workload"]["arrivals"] == "constant"


def test_warmup_and_cooldown_requests_are_sent_but_not_counted(stories_dir: Path, tmp_path: Path) -> None:
    rows_path = tmp_path / "rows.jsonl"
    report = _profile(str(stories_dir), "--concurrency", "1,3", "--warmup", "2", "--cooldown", "0.1",
                      "--export", str(rows_path))
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert len(rows) == 20  # every request sent, both levels
    for level in ("concurrency 1", "concurrency 3"):
        flags = [r["measured"] for r in rows if r["level"] == level]
        assert flags == [False, False] + [True] * 7 + [False]  # 2 warm-up, 10% cool-down
    for p in report["throughput"]["sweep"]:
        assert p["requests"] == {"completed": 7, "failed": 0, "sent": 10, "excluded": {"warmup": 2, "cooldown": 1}}
    assert report["workload"]["warmup"] == 2 and report["workload"]["cooldown"] == 0.1
    result = CliRunner().invoke(app, ["profile", str(stories_dir), "--warmup", "6", "--cooldown", "4", *SMALL])
    assert result.exit_code == 2 and "leave none" in result.output


def test_each_level_sends_its_own_prompts(stories_dir: Path, tmp_path: Path) -> None:
    """A level replaying the previous level's prompts would find them in the prefix cache and report a
    TTFT no fresh traffic gets; prompts of 40+ tokens fill two 16-token blocks, so a replay would hit."""
    result = CliRunner().invoke(app, ["profile", str(stories_dir), "--requests", "8", "--prompt-len", "40:48",
                                      "--output-len", "4", "--concurrency", "1,4", "--out", str(tmp_path / "r"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["throughput"]["sweep"]) == 2
    assert report["throughput"]["prefix_cache_hit_rate"] < 0.05


def test_guidellm_and_vllm_bench_spellings() -> None:
    """`--data prompt_tokens=..,output_tokens=..` (GuideLLM's synthetic data) and `--request-rate inf`
    (vllm bench serve's all-at-once) mean what those tools mean."""
    from optcli.bench.workload import parse_synthetic_data

    assert parse_synthetic_data("prompt_tokens=256,output_tokens=128") == {
        "prompt_len": (256, 257), "output_len": 128, "prefix_len": 0}
    assert parse_synthetic_data("prompt_tokens=64,prompt_tokens_min=32,prompt_tokens_max=96,"
                                "output_tokens_min=8,output_tokens_max=16,prefix_tokens=40") == {
        "prompt_len": (32, 97), "output_len": (8, 16), "prefix_len": 40}
    for bad in ("prompt_tokens=8", "prompt_tokens=8,output_tokens=x", "prompt_tokens=8,output_tokens=4,"
                "prompt_tokens_stdev=2", "prompt_tokens=0,output_tokens=4", "prompt_tokens_min=9,"
                "prompt_tokens_max=3,output_tokens=4"):
        with pytest.raises(UsageError):
            parse_synthetic_data(bad)
    assert plan_levels("inf", None, None, 32)[0] == (THROUGHPUT,)
    assert plan_levels("inf", None, "4", 32)[0] == (LoadLevel("concurrent", concurrency=4),)
    with pytest.raises(UsageError):
        plan_levels("inf,2", None, None, 32)


def test_guidellm_synthetic_data_on_the_command_line(stories_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["profile", str(stories_dir), "--data", "prompt_tokens=20,output_tokens=5",
                                      "--max-requests", "6", "--rate-type", "throughput", "--out", str(tmp_path / "r"),
                                      "--export", str(tmp_path / "req.jsonl"), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "req.jsonl").read_text().splitlines()]
    artifact = [r for r in rows if r["phase"] == rows[0]["phase"]]
    assert len(artifact) == 6 and {r["prompt_tokens"] for r in artifact} == {20}
    assert {r["output_tokens"] for r in artifact} == {5}
    bad = CliRunner().invoke(app, ["profile", str(stories_dir), "--data", "prompt_tokens=20", "--json"])
    assert bad.exit_code == 2 and "output_tokens" in bad.output
