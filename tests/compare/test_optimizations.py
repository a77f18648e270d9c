"""`optcli compare --optimizations`: every row of the article's second table is measured (or null with why),
and the arithmetic that turns paired ratios into reductions keeps each interval the right way round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from optcli.bench.stats import Interval
from optcli.compare.optimizations import _cost, _reduction

OPTCLI = str(Path(sys.executable).parent / "optcli")


def test_reductions_flip_the_interval_of_a_ratio() -> None:
    latency = Interval(median=0.5, low=0.4, high=0.6, n=3, method="t")  # full engine at half the latency
    assert _reduction(latency) == {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    throughput = Interval(median=2.0, low=1.6, high=2.5, n=3, method="t")  # twice the tokens per second
    cost = _cost(throughput)
    assert cost["value"] == 0.5 and cost["ci_low"] < cost["value"] < cost["ci_high"]
    assert abs(cost["ci_low"] - 0.375) < 1e-12 and abs(cost["ci_high"] - 0.6) < 1e-12
    assert _reduction(None) is None and _cost(None) is None


def test_every_row_is_measured_or_says_why(stories_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OPTCLI_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [OPTCLI, "compare", str(stories_dir), "--optimizations", "--recipe", "w4a16-rtn", "--requests", "6",
         "--prompt-len", "8:40", "--output-len", "2:24", "--concurrency", "3", "--max-num-seqs", "3",
         "--repeats", "2", "--device", "cpu", "--out", str(tmp_path / "out"), "--json"],
        capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr
    rows = {row["optimization"]: row for row in json.loads(result.stdout)["rows"]}
    assert {"continuous batching", "prefix caching", "chunked prefill", "CUDA graphs", "Triton kernels",
            "KV-cache dtype", "quantization (w4a16-rtn)"} <= set(rows)
    for name in ("continuous batching", "prefix caching", "chunked prefill", "quantization (w4a16-rtn)"):
        row = rows[name]
        assert row["available"] and row["throughput_increase"]["ratio"] > 0
        assert row["throughput_increase"]["ci_low"] <= row["throughput_increase"]["ratio"] <= row["throughput_increase"]["ci_high"]
        assert set(row["latency_reduction"]) == {"e2e_p50", "e2e_p95", "ttft_p50", "ttft_p95"}
    assert "shared prefix" in rows["prefix caching"]["workload"]
    for name in ("CUDA graphs", "Triton kernels"):  # a CPU run: null and why, never a made-up figure
        assert not rows[name]["available"] and "GPU" in rows[name]["why"] and rows[name]["throughput_increase"] is None
    assert (tmp_path / "out" / "report.md").is_file()
