"""`optcli roi`: every cost, savings, payback and capacity formula against hand-computed examples,
the seed article's own case, and bad inputs as one-line exit-2 errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optcli.cli import app
from optcli.roi import analysis as roi
from optcli.roi import capacity

ROOT = Path(__file__).resolve().parents[2]
ROI_KEYS = {"usd_per_1k_tokens", "usd_per_1k_output_tokens", "daily_cost_usd", "annual_cost_usd",
            "baseline_annual_cost_usd", "annual_savings_usd", "payback_months", "recommendation", "replicas",
            "estimate", "inputs"}
SWEEP = [  # concurrency, requests/s, p95 E2E ms
    {"concurrency": 1, "requests_s": 10.0, "output_tok_s": 0, "total_tok_s": 0, "e2e_p95_ms": 100.0},
    {"concurrency": 4, "requests_s": 30.0, "output_tok_s": 0, "total_tok_s": 0, "e2e_p95_ms": 200.0},
    {"concurrency": 16, "requests_s": 50.0, "output_tok_s": 0, "total_tok_s": 0, "e2e_p95_ms": 600.0},
]


def write_report(path: Path, total_tok_s=2000.0, output_tok_s=500.0, price=None, sweep=SWEEP, **extra) -> Path:
    report = {"model": "elsewhere/model", "recipe": "w4a16-gptq", "hardware": {"device": "cpu", "name": "x"},
              "workload": {"prompt_len": [16, 64], "output_len": 32, "concurrency": 4},
              "throughput": {"total_tok_s": total_tok_s, "output_tok_s": output_tok_s, "requests_s": 1.0,
                             "sweep": sweep},
              "latency_ms": {"e2e": {"p95": 200.0}}, "cost": {"usd_per_1k_tokens": None, "gpu_hour_cost_usd": price},
              **extra}
    path.write_text(json.dumps(report))
    return path


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def run_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def assert_usage_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""


# --- formulas -----------------------------------------------------------------------------------
def test_cost_formulas_by_hand() -> None:
    assert roi.usd_per_1k(3.6, 2000) == pytest.approx(0.0005)  # 3.6 / (2000 x 3600) x 1000
    assert roi.daily_cost(10_000, 1_000, 0.06) == pytest.approx(600.0)  # the seed: $600/day
    assert roi.daily_cost(10_000, 1_000, 0.06) * 365 == pytest.approx(219_000.0)  # → $219k/year
    assert roi.payback_months(50_000, 100_000) == pytest.approx(6.0)
    assert roi.payback_months(1, 0) is None and roi.payback_months(1, -5) is None


@pytest.mark.parametrize(("savings", "months", "label"), [
    (1.0, 0.0, "Strongly recommended"), (1.0, 5.99, "Strongly recommended"), (1.0, 6.0, "Recommended"),
    (1.0, 11.99, "Recommended"), (1.0, 12.0, "Consider if scaling"), (1.0, 23.99, "Consider if scaling"),
    (1.0, 24.0, "Defer until scale justifies"), (0.0, None, "Not worth it"), (-10.0, None, "Not worth it"),
    (None, None, None),
])
def test_recommendation_bands(savings, months, label) -> None:
    assert roi.recommendation(savings, months) == label


def test_seed_case_api_price_baseline(tmp_path: Path) -> None:
    """The seed: $0.06 per 1K tokens, 10,000 requests/day at 1,000 tokens → $600/day, $219,000/year.
    The candidate costs the same $0.06/1K (2.16 $/h at 10 tok/s), so nothing is saved."""
    report = write_report(tmp_path / "r.json", total_tok_s=10.0, output_tok_s=2.5)
    out = run_json("roi", "--report", str(report), "--gpu-hour-cost", "2.16", "--baseline-usd-per-1k-tokens", "0.06",
                   "--requests-per-day", "10000", "--tokens-per-request", "1000")
    assert set(out) >= ROI_KEYS
    assert out["usd_per_1k_tokens"] == pytest.approx(0.06)
    assert out["daily_cost_usd"] == pytest.approx(600.0)
    assert out["annual_cost_usd"] == pytest.approx(219_000.0)
    assert out["baseline_annual_cost_usd"] == pytest.approx(219_000.0)
    assert out["annual_savings_usd"] == pytest.approx(0.0, abs=1e-6)
    assert out["payback_months"] is None and out["recommendation"] == "Not worth it"


def test_report_example_by_hand(tmp_path: Path) -> None:
    """2,000 tok/s total, 500 output tok/s at $3.60/h: $0.0005 per 1K tokens, $0.002 per 1K output
    tokens; 10,000 x 1,000 tokens/day → $5/day, $1,825/year; against $0.06/1K ($219,000/year) saves
    $217,175/year; $50,000 pays back in 50,000 / 217,175 x 12 = 2.763 months."""
    report = write_report(tmp_path / "r.json")
    out = run_json("roi", "--report", str(report), "--gpu-hour-cost", "3.6", "--baseline-usd-per-1k-tokens", "0.06",
                   "--requests-per-day", "10000", "--tokens-per-request", "1000", "--implementation-cost", "50000")
    assert out["usd_per_1k_tokens"] == pytest.approx(0.0005)
    assert out["usd_per_1k_output_tokens"] == pytest.approx(0.002)
    assert out["daily_cost_usd"] == pytest.approx(5.0)
    assert out["annual_cost_usd"] == pytest.approx(1825.0)
    assert out["annual_savings_usd"] == pytest.approx(217_175.0)
    assert out["payback_months"] == pytest.approx(2.7627, abs=1e-4)
    assert out["recommendation"] == "Strongly recommended"
    assert out["estimate"] is False and out["replicas"] is None
    assert out["inputs"]["total_tok_s"] == {"value": 2000.0, "source": "report"}
    assert out["inputs"]["gpu_hour_cost_usd"] == {"value": 3.6, "source": "flag"}
    assert out["inputs"]["implementation_cost_usd"]["source"] == "flag"


def test_baseline_report_and_defaults(tmp_path: Path) -> None:
    """Baseline 500 tok/s at the same $3.60/h: $0.002/1K → $7,300/year vs $1,825: saves $5,475;
    $5,000 pays back in 10.96 months (Recommended). Price from the candidate report, tokens/request
    from its workload ((16 + 63) / 2 + 32 = 71.5), requests/day from the 10,000 default."""
    cand = write_report(tmp_path / "c.json", price=3.6)
    base = write_report(tmp_path / "b.json", total_tok_s=500.0)
    out = run_json("roi", "--report", str(cand), "--baseline-report", str(base), "--tokens-per-request", "1000",
                   "--implementation-cost", "5000")
    assert out["inputs"]["gpu_hour_cost_usd"] == {"value": 3.6, "source": "report"}
    assert out["inputs"]["baseline_gpu_hour_cost_usd"] == {"value": 3.6, "source": "same as candidate"}
    assert out["inputs"]["requests_per_day"] == {"value": 10_000, "source": "default"}
    assert out["baseline_annual_cost_usd"] == pytest.approx(7300.0)
    assert out["annual_savings_usd"] == pytest.approx(5475.0)
    assert out["payback_months"] == pytest.approx(5000 / 5475 * 12)
    assert out["recommendation"] == "Recommended"
    out = run_json("roi", "--report", str(cand))
    assert out["inputs"]["tokens_per_request"] == {"value": 71.5, "source": "report"}
    assert out["baseline_annual_cost_usd"] is None and out["recommendation"] is None


def test_catalog_price_for_gpu(tmp_path: Path) -> None:
    out = run_json("roi", "--report", str(write_report(tmp_path / "r.json")), "--gpu", "h100-80gb")
    assert out["inputs"]["gpu_hour_cost_usd"]["source"] == "catalog"
    assert out["usd_per_1k_tokens"] == pytest.approx(out["inputs"]["gpu_hour_cost_usd"]["value"] / 7200)
    assert out["plan"]["recommendations"][0]["recipe"] == "w4a16-gptq"  # concurrency 4: memory-bound
    assert "error" in out["plan"]["memory"]  # the report's model is not on this machine


# --- capacity -----------------------------------------------------------------------------------
def test_replicas_for_target_rps_at_slo(tmp_path: Path) -> None:
    """p95 <= 250 ms: concurrency 4 (30 req/s, 200 ms) is the best point; 100 req/s → ceil(100/30) = 4."""
    report = write_report(tmp_path / "r.json")
    out = run_json("roi", "--report", str(report), "--gpu-hour-cost", "2", "--target-rps", "100", "--p95-slo-ms", "250")
    assert out["replicas"] == 4
    assert out["capacity"]["per_replica_rps"] == 30.0 and out["capacity"]["concurrency"] == 4
    assert out["capacity"]["fleet_daily_cost_usd"] == pytest.approx(4 * 2 * 24)
    assert capacity.replicas_for(90, 30) == 3 and capacity.replicas_for(0.1, 30) == 1


def test_slo_no_point_meets_exits_2(tmp_path: Path) -> None:
    report = write_report(tmp_path / "r.json")
    result = run("roi", "--report", str(report), "--gpu-hour-cost", "2", "--target-rps", "10", "--p95-slo-ms", "50")
    assert_usage_error(result, "p95 <= 50 ms", "100.0 ms")


def test_p95_interpolation() -> None:
    points = [capacity.Point(p["concurrency"], p["requests_s"], p["e2e_p95_ms"]) for p in SWEEP]
    assert capacity.p95_at(points, 5) == 100.0
    assert capacity.p95_at(points, 20) == pytest.approx(150.0)
    assert capacity.p95_at(points, 45) == pytest.approx(500.0)
    assert capacity.p95_at(points, 51) == float("inf")


def test_autoscaling_replay_by_hand(tmp_path: Path) -> None:
    """Capacity 30 req/s/replica (SLO 250 ms), $2/h, hourly rows:
    00:00 10 req/s on 1: util 33%, p95 100 → stay            cost $2
    01:00 45 req/s on 1: util 150%, p95 500 > 250 → up to 2  cost $2
    02:00 45 req/s on 2: util 75%, p95 162.5 → stay          cost $4
    03:00  5 req/s on 2: util 8% < 30% → down to 1           cost $4      total $12, 6 replica-hours."""
    trace = tmp_path / "trace.csv"
    trace.write_text("time,requests_per_s\n00:00,10\n01:00,45\n02:00,45\n03:00,5\n")
    plot = tmp_path / "replay.png"
    result = run("roi", "--report", str(write_report(tmp_path / "r.json")), "--gpu-hour-cost", "2",
                 "--p95-slo-ms", "250", "--load-trace", str(trace), "--max-replicas", "3", "--plot", str(plot),
                 "--json")
    assert result.exit_code == 0, result.stderr
    auto = json.loads(result.stdout)["capacity"]["autoscaling"]
    assert [r["replicas"] for r in auto["rows"]] == [1, 1, 2, 2]
    assert [round(r["utilization"], 4) for r in auto["rows"]] == [0.3333, 1.5, 0.75, 0.0833]
    assert [r["p95_ms"] for r in auto["rows"]] == pytest.approx([100.0, 500.0, 162.5, 100.0])
    assert [r["cost_usd"] for r in auto["rows"]] == pytest.approx([2, 2, 4, 4])
    assert auto["total_cost_usd"] == pytest.approx(12.0) and auto["replica_hours"] == pytest.approx(6.0)
    assert auto["peak_replicas"] == 2 and auto["intervals_over_slo"] == 1
    assert plot.read_bytes().startswith(b"\x89PNG")
    human = run("roi", "--report", str(write_report(tmp_path / "r.json")), "--gpu-hour-cost", "2",
                "--p95-slo-ms", "250", "--load-trace", str(trace))
    assert human.exit_code == 0 and "autoscaling replay" in human.stdout and "$12.00" in human.stdout


def test_trace_in_seconds_and_max_replicas_clamp() -> None:
    points = [capacity.Point(1, 10.0, 100.0)]
    rows = capacity.replay([("0", 100.0, 0.5), ("1800", 100.0, 0.5), ("3600", 100.0, 0.5)], points, 50.0, 10.0, 1.0,
                           1, 2)["rows"]
    assert [r["replicas"] for r in rows] == [1, 2, 2]  # saturated: up one per interval, capped at 2
    assert rows[0]["p95_ms"] is None and not rows[0]["slo_met"]


# --- estimate -----------------------------------------------------------------------------------
def test_estimate_is_labelled_everywhere(tmp_path: Path) -> None:
    config = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = run_json("roi", "--estimate", str(tmp_path), "--gpu", "H100-80GB", "--recipe", "fp8-dynamic")
    assert out["estimate"] is True and out["inputs"]["total_tok_s"]["source"] == "estimate"
    assert out["plan"]["roofline"]["compute"] == "fp8" and out["plan"]["memory"]["fits"] is True
    assert out["plan"]["recommendations"][0]["recipe"] == "fp8-dynamic"
    human = run("roi", "--estimate", str(tmp_path), "--gpu", "H100-80GB")
    assert human.exit_code == 0 and "ESTIMATE" in human.stdout and "(estimate)" in human.stdout


def small_llama(tmp_path: Path) -> Path:
    config = {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(("typed", "name"), [("h100", "H100-80GB"), ("rtx_4090", "RTX-4090"),
                                             ("RTX 4090", "RTX-4090"), ("l4", "L4")])
def test_gpu_names_people_type(tmp_path: Path, typed: str, name: str) -> None:
    out = run_json("roi", "--estimate", str(small_llama(tmp_path)), "--gpu", typed)
    assert out["inputs"]["gpu"]["value"] == name and out["inputs"]["gpu"]["requested"] == typed
    assert out["plan"]["gpu"] == name and out["inputs"]["gpu_hour_cost_usd"]["source"] == "catalog"


def test_ambiguous_gpu_says_which_it_picked(tmp_path: Path) -> None:
    model = str(small_llama(tmp_path))
    out = run_json("roi", "--estimate", model, "--gpu", "a100")
    assert out["inputs"]["gpu"] == {"value": "A100-80GB", "source": "flag", "requested": "a100",
                                    "resolution": "a100 → A100-80GB (catalog default of A100-40GB, A100-80GB)"}
    human = run("roi", "--estimate", model, "--gpu", "a100")
    assert human.exit_code == 0 and "catalog default of A100-40GB, A100-80GB" in human.stdout
    mine = tmp_path / "mine.yaml"
    mine.write_text("A100-80GB:\n  default: false\n")
    assert_usage_error(run("roi", "--estimate", model, "--gpu", "a100", "--gpu-catalog", str(mine)),
                       "ambiguous GPU 'a100'", "A100-40GB, A100-80GB")


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "needles"), [
    (["--gpu-hour-cost", "-1"], ["--gpu-hour-cost", "positive"]),
    (["--gpu-hour-cost", "0"], ["--gpu-hour-cost"]),
    (["--gpu-hour-cost", "1", "--requests-per-day", "-5"], ["--requests-per-day"]),
    (["--gpu-hour-cost", "1", "--implementation-cost", "-5"], ["--implementation-cost"]),
    (["--gpu", "B200"], ["unknown GPU 'B200'", "H100-80GB", "L40S", "RTX-4090"]),
    (["--gpu-hour-cost", "1", "--baseline-usd-per-1k-tokens", "0.06", "--baseline-report", "x.json"], ["at most one"]),
    (["--gpu-hour-cost", "1", "--estimate", "builtin:tiny-llama"], ["exactly one"]),
    (["--gpu-hour-cost", "1", "--load-trace", "missing.csv", "--p95-slo-ms", "100"], ["--load-trace", "missing.csv"]),
    (["--gpu-hour-cost", "1", "--load-trace", "t.csv"], ["--p95-slo-ms"]),
    ([], ["no GPU price", "--gpu-hour-cost"]),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    report = write_report(tmp_path / "r.json")
    assert_usage_error(run("roi", "--report", str(report), *args), *needles)


def test_report_missing_field_and_no_source(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"throughput": {"output_tok_s": 5.0}}))
    assert_usage_error(run("roi", "--report", str(bad), "--gpu-hour-cost", "1"), "throughput.total_tok_s", "bad.json")
    bad.write_text("{not json")
    assert_usage_error(run("roi", "--report", str(bad), "--gpu-hour-cost", "1"), "not valid JSON")
    assert_usage_error(run("roi", "--gpu-hour-cost", "1"), "--report", "--estimate")
    no_sweep = write_report(tmp_path / "r.json", sweep=None)
    assert_usage_error(run("roi", "--report", str(no_sweep), "--gpu-hour-cost", "1", "--target-rps", "5"),
                       "throughput.sweep")
    trace = tmp_path / "t.csv"
    trace.write_text("when,load\n1,2\n")
    assert_usage_error(run("roi", "--report", str(write_report(tmp_path / "r.json")), "--gpu-hour-cost", "1",
                           "--load-trace", str(trace), "--p95-slo-ms", "300"), "time,requests_per_s")


def test_json_stdout_is_one_object_from_the_installed_entry_point(tmp_path: Path) -> None:
    """The contract as scripts see it: a real process, exactly one JSON object on stdout."""
    report = write_report(tmp_path / "r.json")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-c", "from optcli.cli import run; run()", "roi", "--report", str(report),
           "--gpu-hour-cost", "3.6", "--baseline-usd-per-1k-tokens", "0.06", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) >= ROI_KEYS and result.stdout.count("\n") == 1
    bad = subprocess.run(cmd[:-1] + ["--gpu", "nope"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1


def test_profile_sweep_feeds_the_capacity_plan(tmp_path: Path) -> None:
    """A real (tiny) profile run records latency vs concurrency under `throughput.sweep`, top-level keys unchanged."""
    from optcli.bench.args import ProfileArgs
    from optcli.bench.profile import profile
    from optcli.bench.workload import Workload
    from optcli.config import EngineConfig

    workload = Workload(requests=4, prompt_len=(8, 16), output_len=4, concurrency=2, sweep=(1,))
    config = EngineConfig(device="cpu", max_num_seqs=4)
    report = profile(ProfileArgs("builtin:tiny-llama", workload=workload, config=config)).to_dict()
    assert "sweep" not in report and report["workload"]["concurrency_sweep"] == [1, 2]
    sweep = report["throughput"]["sweep"]
    assert [p["concurrency"] for p in sweep] == [1, 2]
    assert all(p["requests_s"] > 0 and p["e2e_p95_ms"] > 0 for p in sweep)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    out = run_json("roi", "--report", str(path), "--gpu-hour-cost", "1", "--target-rps", "1000")
    best = max(sweep, key=lambda p: p["requests_s"])
    assert out["capacity"]["per_replica_rps"] == best["requests_s"]
    assert out["replicas"] == -(-1000 // best["requests_s"])


def test_worked_example_script_parses() -> None:
    script = ROOT / "examples" / "quantize_profile_roi.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert all(f"optcli {cmd}" in text for cmd in ("quantize", "profile", "roi"))
    assert "examples/quantize_profile_roi.sh" in (ROOT / "README.md").read_text()


# --- what the figures were measured on ------------------------------------------------------------
def test_a_gpu_priced_from_a_cpu_measured_report_is_warned_about(tmp_path: Path) -> None:
    report = str(write_report(tmp_path / "r.json", hardware={"device": "cpu", "name": "AMD EPYC 9B14"}))
    out = run_json("roi", "--report", report, "--gpu", "h100")
    assert len(out["warnings"]) == 1
    assert "H100-80GB" in out["warnings"][0] and "measured on a CPU (AMD EPYC 9B14)" in out["warnings"][0]
    human = run("roi", "--report", report, "--gpu", "h100")
    assert human.exit_code == 0 and "warning:" in human.stderr and "a CPU (AMD EPYC 9B14)" in human.stderr
    # the user's own price for the machine that was measured: nothing to warn about
    assert run_json("roi", "--report", report, "--gpu-hour-cost", "2")["warnings"] == []


def test_a_gpu_priced_from_another_gpus_report_is_warned_about(tmp_path: Path) -> None:
    a100 = {"device": "cuda", "name": "NVIDIA A100-SXM4-80GB", "memory_bytes": 80 * 2**30}
    report = str(write_report(tmp_path / "r.json", hardware=a100))
    warnings = run_json("roi", "--report", report, "--gpu", "h100")["warnings"]
    assert len(warnings) == 1 and "measured on NVIDIA A100-SXM4-80GB" in warnings[0]
    assert run_json("roi", "--report", report, "--gpu", "a100-80gb")["warnings"] == []
    assert run_json("roi", "--report", report, "--gpu-hour-cost", "2")["warnings"] == []


def test_the_reports_contention_warning_is_carried_into_roi(tmp_path: Path) -> None:
    busy = "another process used 48% of the CPU during this run: absolute figures are low"
    hardware = {"device": "cpu", "name": "x", "contention": {"busy_share": 0.48, "steal_share": 0.0, "warning": busy}}
    report = str(write_report(tmp_path / "r.json", hardware=hardware))
    out = run_json("roi", "--report", report, "--gpu-hour-cost", "2")
    assert out["warnings"] == [f"the report was measured on a busy machine: {busy}"]
    human = run("roi", "--report", report, "--gpu-hour-cost", "2")
    assert human.exit_code == 0 and busy in human.stderr.replace("\n", " ")
    quiet = {"device": "cpu", "name": "x", "contention": {"busy_share": 0.01, "steal_share": 0.0, "warning": None}}
    assert run_json("roi", "--report", str(write_report(tmp_path / "q.json", hardware=quiet)),
                    "--gpu-hour-cost", "2")["warnings"] == []


def test_the_memory_plan_stops_at_the_models_context(tmp_path: Path) -> None:
    model = str(small_llama(tmp_path))  # max_position_embeddings 512
    report = str(write_report(tmp_path / "r.json", model=model))
    out = run_json("roi", "--report", report, "--gpu", "h100")
    memory = out["plan"]["memory"]
    assert memory["context_len"] == 512 and memory["num_seqs"] == 4
    assert out["inputs"]["context_len"] == {"value": 512, "source": "the model's context (max_position_embeddings)"}
    human = run("roi", "--report", report, "--gpu", "h100")
    assert human.exit_code == 0 and "4 × 512 tokens fits" in human.stdout and "2048" not in human.stdout
    assert run_json("roi", "--report", report, "--gpu", "h100", "--context-len", "256")["plan"]["memory"][
        "context_len"] == 256
    assert_usage_error(run("roi", "--report", report, "--gpu", "h100", "--context-len", "4096"),
                       "--context-len 4096", "context of 512 tokens")
