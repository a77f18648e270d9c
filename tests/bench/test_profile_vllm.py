"""`profile --engine vllm`: the artifact, then its source, each served by `vllm serve` for the run (here a fake
`vllm` on PATH that records its argv and hands the same flags to `optcli serve`), measured as endpoints:
the online load, endpoint accuracy, and the side-by-side comparison; an absent vllm is exit 2."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import OPTCLI

SMALL = ["--requests", "4", "--prompt-len", "8:16", "--output-len", "4", "--concurrency", "2", "--json"]


def fake_vllm(bin_dir: Path, record: Path) -> None:
    """`vllm serve MODEL --host H --port P ...`: records its argv, then serves MODEL with `optcli serve`."""
    bin_dir.mkdir()
    script = bin_dir / "vllm"
    script.write_text(
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        "argv = sys.argv[1:]\n"
        f"with open({str(record)!r}, 'a') as fh:\n    fh.write(json.dumps(argv) + '\\n')\n"
        "flags = dict(zip(argv[2::2], argv[3::2]))\n"
        "keep = ['--host', '--port', '--served-model-name', '--max-num-seqs', '--max-model-len']\n"
        "args = [a for k in keep if k in flags for a in (k, flags[k])]\n"
        f"os.execv({OPTCLI!r}, [{OPTCLI!r}, 'serve', argv[1], *args, '--device', 'cpu'])\n"
    )
    script.chmod(0o755)


def test_profile_engine_vllm_serves_the_artifact_and_its_source(stories_dir: Path, tmp_path: Path) -> None:
    record = tmp_path / "argv.jsonl"
    fake_vllm(tmp_path / "bin", record)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    rows = tmp_path / "rows.jsonl"
    result = subprocess.run([OPTCLI, "profile", str(stories_dir), "--baseline", str(stories_dir), "--engine", "vllm",
                             "--tensor-parallel-size", "2", "--export", str(rows), *SMALL],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    launches = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(launches) == 2  # the artifact's server, then the source's: one at a time
    for argv in launches:
        flags = dict(zip(argv[2::2], argv[3::2], strict=False))
        assert argv[0] == "serve" and argv[1] == str(stories_dir) and flags["--tensor-parallel-size"] == "2"
        assert flags["--host"] == "127.0.0.1" and flags["--served-model-name"] == str(stories_dir)
    assert report["workload"]["engine"]["name"] == "vllm" and report["workload"]["engine"]["tensor_parallel_size"] == 2
    tp = report["throughput"]
    assert tp["output_tok_s"] > 0 and tp["failed_requests"] == 0 and tp["baseline_online_output_tok_s"] > 0
    assert report["latency_ms"]["ttft"]["p50"] > 0
    acc = report["accuracy"]  # the same weights behind both servers
    assert acc["kld_mean"] < 1e-6 and acc["top1_agreement"] == 1.0 and abs(acc["ppl_ratio"] - 1) < 1e-6
    rows_by_phase = [json.loads(line)["phase"] for line in rows.read_text().splitlines()]
    assert rows_by_phase == ["candidate"] * 4 + ["baseline"] * 4
    assert {r["metric"] for r in report["comparison"]["rows"] if r["ratio"] is not None} >= {"output tok/s (online)",
                                                                                             "TTFT p50 (ms)"}


def test_profile_engine_vllm_without_vllm_is_exit_2(stories_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no vllm anywhere
    result = subprocess.run([OPTCLI, "profile", str(stories_dir), "--engine", "vllm", *SMALL], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2 and "vLLM is not installed" in result.stderr
    for args in (["--engine", "tgi"], ["--tensor-parallel-size", "2"]):
        result = subprocess.run([OPTCLI, "profile", str(stories_dir), *args, *SMALL], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, (args, result.stderr)
