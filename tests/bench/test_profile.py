"""`optcli profile` end to end on the real stories260K and its quantized artifacts (small workloads)."""

from __future__ import annotations

import html as htmllib
import json
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import optcli, shared_data

from optcli.report.markdown import SUMMARY_FIELDS as SHOWN_FIELDS  # the rows the summaries show

DESIGN_KEYS = {"model", "baseline", "recipe", "hardware", "workload", "throughput", "latency_ms", "memory", "accuracy",
               "batch_efficiency", "gpu_utilization", "cost", "kpi", "comparison", "roofline", "versions"}
THROUGHPUT_FIELDS = {"throughput.output_tok_s", "throughput.online_output_tok_s", "throughput.total_tok_s",
                     "throughput.decode_tok_s", "throughput.prompt_tok_s"}
SUMMARY_FIELDS = THROUGHPUT_FIELDS | {"latency_ms.ttft.p50", "latency_ms.ttft.p95", "latency_ms.ttft.p99",
                                      "latency_ms.tpot.p50", "latency_ms.e2e.p50", "latency_ms.e2e.p95",
                                      "latency_ms.e2e.p99", "memory.weights_bytes"}
SMALL = ["--requests", "4", "--prompt-len", "8:16", "--output-len", "6", "--concurrency", "2"]


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(shared_data("tinystories_train_sample.txt").read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return path


def check_report(report: dict) -> None:
    assert set(report) == DESIGN_KEYS
    assert set(report["throughput"]) >= {"output_tok_s", "total_tok_s", "requests_s"}
    for metric in ("ttft", "tpot", "itl", "e2e"):
        assert set(report["latency_ms"][metric]) == {"mean", "p50", "p95", "p99"}
        assert report["latency_ms"][metric]["p50"] is not None
    assert set(report["memory"]) == {"weights_bytes", "peak_bytes", "kv_cache_bytes"}
    assert set(report["accuracy"]) == {"ppl", "baseline_ppl", "ppl_ratio", "kld_mean", "kld_p99", "top1_agreement"}
    assert report["gpu_utilization"] is None  # no GPU here: not measurable, not invented
    assert set(report["kpi"]) == {"passed", "checks"}


def at(node, field: str):
    for key in field.split("."):
        node = node[key]
    return node


def log_median(values) -> float:
    """The median on the log scale, as stats.py takes it: the middle value, or the geometric mean of the middle two."""
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else math.sqrt(values[middle - 1] * values[middle])


def check_comparison(report: dict) -> None:
    """The source measured the same way: its figures, ratios of the figures in this report, one warning
    per throughput figure where the artifact is slower, and a roofline for both."""
    tp, comparison = report["throughput"], report["comparison"]
    base = comparison["baseline"]
    assert tp["baseline_output_tok_s"] == base["throughput"]["output_tok_s"] > 0
    assert tp["baseline_total_tok_s"] == base["throughput"]["total_tok_s"] > tp["baseline_output_tok_s"]
    assert tp["baseline_requests_s"] == base["throughput"]["requests_s"] > 0
    assert tp["baseline_online_output_tok_s"] == base["throughput"]["online_output_tok_s"] > 0
    for metric in ("ttft", "tpot", "itl", "e2e"):
        assert set(base["latency_ms"][metric]) == {"mean", "p50", "p95", "p99"}
        assert base["latency_ms"][metric]["p50"] > 0
    assert base["memory"]["weights_bytes"] > 0
    rows = comparison["rows"]
    assert {r["field"] for r in rows} >= SUMMARY_FIELDS
    assert {r["field"] for r in rows if r["higher_is_better"]} == THROUGHPUT_FIELDS
    repeats = report["workload"]["repeats"]["repeats"]
    for row in rows:
        assert row["artifact"] == row["value"] == at(report, row["field"]) and row["baseline"] == at(base, row["field"])
        if row["field"] == "memory.weights_bytes":  # not timed: exact, no interval, no verdict
            assert row["ratio"] == pytest.approx(row["value"] / row["baseline"])
            assert row["ci_low"] is row["ci_high"] is row["verdict"] is None
            continue
        # each figure is the median of `repeats` interleaved runs; the ratio the median of the paired ratios
        runs = row["runs"]
        assert row["repeats"] == repeats == len(runs["value"]) == len(runs["baseline"])
        assert row["value"] == pytest.approx(log_median(runs["value"]))
        assert row["baseline"] == pytest.approx(log_median(runs["baseline"]))
        paired = [a / b for a, b in zip(runs["value"], runs["baseline"], strict=True)]
        assert row["ratio"] == pytest.approx(log_median(paired)), row
        assert row["ci_low"] <= row["ratio"] <= row["ci_high"]
        assert row["value_ci_low"] <= row["value"] <= row["value_ci_high"]
        side = "above" if row["ci_low"] > 1 else "below" if row["ci_high"] < 1 else "across"
        expected = {"across": "no measurable difference", "above": "faster" if row["higher_is_better"] else "slower",
                    "below": "slower" if row["higher_is_better"] else "faster"}[side]
        assert row["verdict"] == expected, row
    slower = [r for r in rows if r["higher_is_better"] and r["verdict"] == "slower"]
    assert len(comparison["warnings"]) == len(slower)
    # offline (every request at once) bounds online from above for the same model, or a note says why
    for who, offline, online in (("artifact", tp["output_tok_s"], tp["online_output_tok_s"]),
                                 ("source", tp["baseline_output_tok_s"], tp["baseline_online_output_tok_s"])):
        assert offline >= online or any(f"of the {who} " in note for note in tp["notes"]), (who, offline, online)
    name = report["recipe"] or report["model"]
    for row, warning in zip(slower, comparison["warnings"], strict=True):
        assert warning.startswith(f"{name}: ") and f"its source's {row['metric'].split(' (')[0]} at " in warning

    roofline = report["roofline"]
    peak = roofline["peak_bandwidth_gbs"]
    assert peak > 0 and roofline["peak_source"].startswith(("measured: read probe over", "measured: torch.sum over",
                                                            "catalog: "))
    for side, figures in ((roofline["artifact"], report), (roofline["baseline"], base)):
        assert side["decode_tok_s"] == figures["throughput"]["decode_tok_s"] > 0
        assert side["weights_bytes"] == figures["memory"]["weights_bytes"]
        assert side["achieved_gbs"] == pytest.approx(side["decode_tok_s"] * side["weights_bytes"] / 1e9)
        assert side["share_of_peak"] == pytest.approx(side["achieved_gbs"] / peak)
        assert 0 < side["share_of_peak"] <= 1.5


def check_rendered_comparison(report: dict, out: Path) -> None:
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "**Source vs artifact**" in md and "| metric | source | artifact | ratio [95% CI] | verdict |" in md
    assert "<h2>Source vs artifact</h2>" in html
    for label in ("output tok/s (offline)", "output tok/s (online)", "TTFT p95 (ms)", "E2E p95 (ms)"):
        assert f"| {label} |" in md and f"<td>{htmllib.escape(label)}</td>" in html
    # every timed row: its ratio with the interval, and the verdict in words
    for row in report["comparison"]["rows"]:
        if row["verdict"] is not None and row["field"] in SHOWN_FIELDS:
            cell = re.search(rf"\| {re.escape(row['metric'])} \|[^|]*\|[^|]*\| ([^|]*) \| ([^|]*) \|", md)
            assert cell and re.fullmatch(r"\d+\.\d+x \[\d+\.\d+, \d+\.\d+\]", cell[1].strip()), (row, cell)
            assert cell[2].strip() == row["verdict"]
            assert f"<td>{htmllib.escape(cell[1].strip())}</td><td>{row['verdict']}</td>" in html
    assert f"medians of {report['workload']['repeats']['repeats']} interleaved repeats" in md
    assert "roofline (batch-1 decode): artifact " in md and "roofline (batch-1 decode): artifact " in html
    warnings = report["comparison"]["warnings"]
    assert ("> **Slower than its source:**" in md) == bool(warnings) and ("Slower than its source" in html) == bool(warnings)
    busy = report["hardware"]["contention"]["warning"]  # this machine may be busy or not: either way, said so
    assert ("**Busy machine:**" in md) == bool(busy) and ("Busy machine:" in html) == bool(busy)
    for warning in warnings:
        assert f"> - {warning}" in md and htmllib.escape(warning) in html


def test_identical_models_have_zero_kld_and_full_agreement(stories_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = optcli("profile", str(stories_dir), "--baseline", str(stories_dir), "--eval-text", str(eval_text),
                    *SMALL, "--gpu-hour-cost", "2.5", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1  # one JSON object, nothing else
    report = json.loads(result.stdout)
    check_report(report)
    check_comparison(report)
    check_rendered_comparison(report, out)
    assert report["accuracy"]["kld_mean"] == pytest.approx(0, abs=1e-6)
    assert report["accuracy"]["top1_agreement"] == 1.0
    assert report["accuracy"]["ppl_ratio"] == pytest.approx(1.0)
    assert report["throughput"]["output_tok_s"] > 0 and report["cost"]["usd_per_1k_tokens"] > 0
    assert json.loads((out / "report.json").read_text()) == report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "http://" not in html  # latency CDFs (both) + bars
    assert 'alt="baseline vs candidate"' in html and report["throughput"]["baseline_output_tok_s"] > 0
    assert "ttft" in (out / "report.md").read_text().lower()


def test_int8_head_is_profiled_with_its_accuracy_cost(stories_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    """--lm-head int8: the head's bytes and time per step, and what rounding it costs (engine vs engine)."""
    out = tmp_path / "report"
    result = optcli("profile", str(stories_dir), "--eval-text", str(eval_text), *SMALL, "--lm-head", "int8",
                    "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    head = report["accuracy"]["lm_head"]
    assert head["format"] == "int8" and 0 < head["kld_mean"] < 0.1 and 0.8 < head["top1_agreement"] <= 1
    assert head["tokens_scored"] > 100
    from optcli.engine.kernels import cpu_amx

    # stories260K: a tied 512 x 64 matrix, now int8, with a fp32 scale a row (and, off AMX's int8 tiles, the
    # bf16 vector of ones torch's int8 kernel scales by)
    vocab, hidden = 512, 64
    ones = 0 if cpu_amx.library() is not None else vocab * 2
    head_cost = report["throughput"]["lm_head"]
    assert head_cost["bytes"] == vocab * hidden + vocab * 4 + ones and head_cost["tied"]
    assert head_cost["ms_per_step_batch1"] > 0 and 0 < head_cost["share_of_weights"] < 1
    assert "LM head: " in (out / "report.md").read_text() and "int8 head vs dense: KLD" in (out / "report.md").read_text()


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8-int8"])
def test_quantized_artifact_is_compared_with_its_source(stories_dir: Path, eval_text: Path, tmp_path: Path,
                                                        recipe: str) -> None:
    from transformers import AutoTokenizer

    from optcli.calibration.dataset import build_from_source, save_calibration_set
    from optcli.quantize.pipeline import quantize

    calib = save_calibration_set(build_from_source(AutoTokenizer.from_pretrained(stories_dir), str(eval_text), 8, 64),
                                 tmp_path / "calib")
    artifact = tmp_path / recipe
    quantize(str(stories_dir), recipe, artifact, calibration=calib, device="cpu")
    out = tmp_path / "report"
    result = optcli("profile", str(artifact), "--eval-text", str(eval_text), *SMALL, "--concurrency", "1,2",
                    "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    check_report(report)
    check_comparison(report)
    check_rendered_comparison(report, out)
    weights = next(r for r in report["comparison"]["rows"] if r["field"] == "memory.weights_bytes")
    assert weights["ratio"] < 0.7  # the 4/8-bit artifact against its fp32 source
    assert report["workload"]["concurrency_sweep"] == [1, 2]
    assert 'alt="throughput vs concurrency"' in (out / "report.html").read_text()
    assert report["recipe"] == recipe and report["baseline"] == str(stories_dir)
    assert 0 < report["accuracy"]["kld_mean"] < 1 and report["accuracy"]["top1_agreement"] < 1
    assert report["memory"]["weights_bytes"] < 0.7 * sum(p.stat().st_size for p in stories_dir.glob("*.safetensors"))


def test_kpi_gates_exit_3_on_failure_and_0_when_met(stories_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    impossible = tmp_path / "impossible.yaml"
    # flat names and the seed's nested KPIS shape in one file; every relative gate impossible
    impossible.write_text("min_output_tok_s: 1.0e12\nmax_kld_mean: 0.5\nthroughput: {degradation_threshold: 100}\n"
                          "cost: {increase_threshold: 0.001}\naccuracy: {acceptable_drop: -1}\n")
    out = tmp_path / "failed"
    result = optcli("profile", str(stories_dir), "--baseline", str(stories_dir), "--eval-text", str(eval_text), *SMALL,
                    "--kpi", str(impossible), "--out", str(out))
    assert result.returncode == 3, result.stderr
    assert "min_output_tok_s" in result.stderr
    report = json.loads((out / "report.json").read_text())  # written before the gate failed
    assert report["kpi"]["passed"] is False
    assert {c["passed"] for c in report["kpi"]["checks"]} == {True, False}
    relative = [c for c in report["kpi"]["checks"] if c["name"].endswith(("degradation_threshold)",
                                                                         "increase_threshold)", "acceptable_drop)"))]
    assert len(relative) == 3 and not any(c["passed"] for c in relative)
    assert all(c["baseline"] is not None and c["value"] is not None for c in relative)
    assert "cost.increase_threshold" in result.stderr
    assert "source vs artifact" in result.stdout and "roofline (batch-1 decode): artifact " in result.stdout
    assert "baseline output tok/s (ratio)" not in result.stdout  # replaced by the side-by-side table
    for warning in report["comparison"]["warnings"]:  # yellow lines on stderr, after the table
        assert warning in " ".join(result.stderr.split())
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("min_output_tok_s: 0.001\np99_e2e_ms_max: 600000\nmax_kld_mean: 0.5\n"
                       "latency: {p95_threshold: 600000, p99_threshold: 600000}\n"
                       "throughput: {minimum: 0.001, degradation_threshold: 0.01}\ncost: {increase_threshold: 100}\n"
                       "accuracy: {acceptable_drop: 0.5}\n")
    result = optcli("profile", str(stories_dir), "--baseline", str(stories_dir), "--eval-text", str(eval_text), *SMALL,
                    "--kpi", str(lenient), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kpi"]["passed"] is True


def test_a_busy_machine_is_said_so(stories_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    """A CPU-bound process beside the run: report.json's hardware.contention carries the warning, the summary
    prints it as a yellow line, and the figures are still medians of interleaved repeats (--repeats 2)."""
    out = tmp_path / "report"
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        result = optcli("profile", str(stories_dir), "--baseline", str(stories_dir), "--eval-text", str(eval_text),
                        *SMALL, "--repeats", "2", "--out", str(out))
    finally:
        hog.kill()
        hog.wait()
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    contention = report["hardware"]["contention"]
    assert contention["busy_share"] >= 0.1 and contention["steal_share"] is not None
    assert contention["warning"].startswith("another process used ") and contention["warning"].endswith(
        "% of the CPU during this run: absolute figures are low, ratios are interleaved")
    assert f"warning: {contention['warning']}" in " ".join(result.stderr.split())
    assert f"**Busy machine:** {contention['warning']}" in (out / "report.md").read_text()
    assert report["workload"]["repeats"]["repeats"] == 2 and report["workload"]["repeats"]["order"] == "ABBA"
    check_comparison(report)
    assert "medians of 2 interleaved repeats" in " ".join(result.stdout.split())  # the table's caption


def test_bad_input_exits_2(tmp_path: Path, stories_dir: Path) -> None:
    for args in (["--prompt-len", "9"], ["--prompt-len", "20:10"], ["--duration", "5"], ["--eval-text", "/nope.txt"]):
        result = optcli("profile", str(stories_dir), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    typo = tmp_path / "kpi.yaml"
    typo.write_text("p95_ttft_ms_mx: 10\n")
    result = optcli("profile", str(stories_dir), "--kpi", str(typo))
    assert result.returncode == 2 and str(typo) in result.stderr and "p95_ttft_ms_mx" in result.stderr
    relative = tmp_path / "relative.yaml"
    relative.write_text("throughput: {degradation_threshold: 0.8}\n")
    result = optcli("profile", str(stories_dir), "--kpi", str(relative), "--out", str(tmp_path / "none"))
    assert result.returncode == 2 and "throughput.degradation_threshold" in result.stderr and "--baseline" in result.stderr
    assert not (tmp_path / "none").exists()


def _fake_openai_server(port: int):
    """A tiny OpenAI-style streaming /v1/completions on 127.0.0.1."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict):
        import asyncio

        async def events():
            n = body.get("max_tokens", 4)
            for i in range(n):
                await asyncio.sleep(0.005)
                chunk = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": len(body["prompt"]) + n}
            yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return server, thread


def test_endpoint_load_test_against_an_openai_style_server(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, thread = _fake_openai_server(port)
    try:
        result = optcli("profile", "fake-model", "--endpoint", f"http://127.0.0.1:{port}", *SMALL, "--json")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    check_report(report)
    assert report["accuracy"]["kld_mean"] is None  # an endpoint gives no logits to compare: null, not invented
    assert report["comparison"] is None and report["roofline"] is None  # no source, no weights here
    assert report["throughput"]["decode_tok_s"] is None
    assert report["throughput"]["failed_requests"] == 0
    assert report["throughput"]["output_tok_s"] > 0
    assert report["latency_ms"]["ttft"]["p50"] < report["latency_ms"]["e2e"]["p50"]


def figures(output_tok_s: float, online_tok_s: float, decode_tok_s: float | None, ttft_ms: float, weights: int) -> dict:
    latency = {m: {"mean": ttft_ms, "p50": ttft_ms, "p95": ttft_ms, "p99": ttft_ms} for m in ("ttft", "tpot", "itl", "e2e")}
    return {"throughput": {"output_tok_s": output_tok_s, "total_tok_s": 2 * output_tok_s, "requests_s": 1.0,
                           "online_output_tok_s": online_tok_s, "decode_tok_s": decode_tok_s},
            "latency_ms": latency, "memory": {"weights_bytes": weights, "peak_bytes": None, "kv_cache_bytes": None}}


def test_a_slower_artifact_gets_a_warning_per_slower_throughput_figure() -> None:
    from optcli.bench.comparison import comparison as _comparison
    from optcli.bench.workload import Workload

    artifact = {"model": "out/gptq", "recipe": "w4a16-gptq", **figures(42.0, 300.0, 10.0, 5.0, 1000)}
    comparison = _comparison(artifact, figures(100.0, 200.0, 20.0, 4.0, 4000), Workload(requests=16, concurrency=4))
    assert comparison["warnings"] == [
        "w4a16-gptq: 0.42x its source's output tok/s at 16 requests (offline)",
        "w4a16-gptq: 0.42x its source's total tok/s at 16 requests (offline)",
        "w4a16-gptq: 0.50x its source's decode tok/s at batch 1",
    ]  # online was faster (1.5x): no warning; slower latencies are in the table, not warnings
    rows = {r["metric"]: r for r in comparison["rows"]}
    assert rows["TTFT p50 (ms)"]["ratio"] == 1.25 and rows["weights (bytes)"]["ratio"] == 0.25

    unmeasured = {"model": "my-model", "recipe": None, **figures(42.0, 10.0, None, 5.0, 1000)}
    comparison = _comparison(unmeasured, figures(0.0, 20.0, 20.0, 4.0, 4000), Workload(requests=8, rate=2.0))
    assert comparison["warnings"] == ["my-model: 0.50x its source's output tok/s at poisson 2 req/s (8 requests, online)"]
    rows = {r["metric"]: r for r in comparison["rows"]}
    assert rows["output tok/s (offline)"]["ratio"] is None and rows["decode tok/s (batch 1)"]["ratio"] is None
