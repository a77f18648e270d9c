"""`optcli profile` end to end on the real stories260K and its quantized artifacts (small workloads)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import shared_data

OPTCLI = str(Path(sys.executable).parent / "optcli")
DESIGN_KEYS = {"model", "baseline", "recipe", "hardware", "workload", "throughput", "latency_ms", "memory", "accuracy",
               "batch_efficiency", "gpu_utilization", "cost", "kpi", "versions"}
SMALL = ["--requests", "4", "--prompt-len", "8:16", "--output-len", "6", "--concurrency", "2"]


def optcli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([OPTCLI, *args], capture_output=True, text=True, timeout=600)


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


def test_identical_models_have_zero_kld_and_full_agreement(stories_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = optcli("profile", str(stories_dir), "--baseline", str(stories_dir), "--eval-text", str(eval_text),
                    *SMALL, "--gpu-hour-cost", "2.5", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    check_report(report)
    assert report["accuracy"]["kld_mean"] == pytest.approx(0, abs=1e-6)
    assert report["accuracy"]["top1_agreement"] == 1.0
    assert report["accuracy"]["ppl_ratio"] == pytest.approx(1.0)
    assert report["throughput"]["output_tok_s"] > 0 and report["cost"]["usd_per_1k_tokens"] > 0
    assert json.loads((out / "report.json").read_text()) == report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "http://" not in html  # latency CDF + baseline bars
    assert 'alt="baseline vs candidate"' in html and report["throughput"]["baseline_output_tok_s"] > 0
    assert "ttft" in (out / "report.md").read_text().lower()


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8-int8"])
def test_quantized_artifact_is_compared_with_its_source(stories_dir: Path, eval_text: Path, tmp_path: Path,
                                                        recipe: str) -> None:
    from transformers import AutoTokenizer

    from optcli.calibration import build_from_source, save_calibration_set
    from optcli.quantize import quantize

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
    assert report["workload"]["concurrency_sweep"] == [1, 2]
    assert 'alt="throughput vs concurrency"' in (out / "report.html").read_text()
    assert report["recipe"] == recipe and report["baseline"] == str(stories_dir)
    assert 0 < report["accuracy"]["kld_mean"] < 1 and report["accuracy"]["top1_agreement"] < 1
    assert report["memory"]["weights_bytes"] < 0.7 * sum(p.stat().st_size for p in stories_dir.glob("*.safetensors"))


def test_kpi_gates_exit_3_on_failure_and_0_when_met(stories_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    impossible = tmp_path / "impossible.yaml"
    impossible.write_text("min_output_tok_s: 1.0e12\nmax_kld_mean: 0.5\n")
    out = tmp_path / "failed"
    result = optcli("profile", str(stories_dir), "--baseline", str(stories_dir), "--eval-text", str(eval_text), *SMALL,
                    "--kpi", str(impossible), "--out", str(out))
    assert result.returncode == 3, result.stderr
    assert "min_output_tok_s" in result.stderr
    report = json.loads((out / "report.json").read_text())  # written before the gate failed
    assert report["kpi"]["passed"] is False
    assert {c["passed"] for c in report["kpi"]["checks"]} == {True, False}
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("min_output_tok_s: 0.001\np99_e2e_ms_max: 600000\nmax_kld_mean: 0.5\n")
    result = optcli("profile", str(stories_dir), "--baseline", str(stories_dir), "--eval-text", str(eval_text), *SMALL,
                    "--kpi", str(lenient), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kpi"]["passed"] is True


def test_bad_input_exits_2(tmp_path: Path, stories_dir: Path) -> None:
    for args in (["--prompt-len", "9"], ["--prompt-len", "20:10"], ["--duration", "5"], ["--eval-text", "/nope.txt"]):
        result = optcli("profile", str(stories_dir), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    typo = tmp_path / "kpi.yaml"
    typo.write_text("p95_ttft_ms_mx: 10\n")
    result = optcli("profile", str(stories_dir), "--kpi", str(typo))
    assert result.returncode == 2 and str(typo) in result.stderr and "p95_ttft_ms_mx" in result.stderr


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
    assert report["throughput"]["failed_requests"] == 0
    assert report["throughput"]["output_tok_s"] > 0
    assert report["latency_ms"]["ttft"]["p50"] < report["latency_ms"]["e2e"]["p50"]
