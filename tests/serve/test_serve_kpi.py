"""`serve --kpi`: the article's KPI file watched live (gauges, /kpi, one log line per breach and recovery, the
accuracy probe every eval_frequency requests), and its bad inputs refused before the model loads."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

OPTCLI = str(Path(sys.executable).parent / "optcli")
# the article's KPIS with a p95 no request can meet, a 2 s window, and a probe every 50 requests
KPI = """\
latency:    {p95_threshold: 1, p99_threshold: 3000, alert_window: 2}
throughput: {minimum: 100, degradation_threshold: 0.8}
cost:       {increase_threshold: 1.2, budget_alert: 0.9}
accuracy:   {acceptable_drop: 0.02, eval_frequency: 50}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def _gauge(metrics: str, name: str, kpi: str | None = None) -> float:
    label = f'kpi="{kpi}",' if kpi else ""
    m = re.search(rf'^{re.escape(name)}\{{{label}model_name="[^"]*"\}} (\S+)$', metrics, re.M)
    assert m, (name, kpi)
    return float(m.group(1))


def _complete(port: int, i: int) -> int:
    body = json.dumps({"model": "builtin:tiny-llama", "prompt": f"Once upon a time {i}", "max_tokens": 8}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _until(predicate, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_serve_watches_the_articles_kpis_live(tmp_path: Path) -> None:
    kpi = tmp_path / "kpi.yaml"
    kpi.write_text(KPI)
    baseline = tmp_path / "report.json"  # what degradation_threshold compares with: a profile's served throughput
    baseline.write_text(json.dumps({"throughput": {"output_tok_s": 900.0, "online_output_tok_s": 300.0}}))
    port = _free_port()
    proc = subprocess.Popen([OPTCLI, "serve", "builtin:tiny-llama", "--port", str(port), "--kpi", str(kpi),
                             "--baseline-report", str(baseline), "--gpu-hour-cost", "1e9", "--monthly-budget", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in proc.stdout.readline()
        metrics = _get(f"http://127.0.0.1:{port}/metrics")
        # a GPU-hour price of 1e9 USD against a 1 USD budget: breached from the first tick, load or not
        assert _gauge(metrics, "optcli:kpi_breached", "cost_budget_share") == 1
        assert _gauge(metrics, "optcli:kpi_threshold", "latency_e2e_p95_ms") == 1
        assert _gauge(metrics, "optcli:kpi_breached", "latency_e2e_p95_ms") == 0  # no traffic: no breach
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda i: _complete(port, i), range(100)))
        assert codes == [200] * 100  # the probes never fail a request
        metrics = _get(f"http://127.0.0.1:{port}/metrics")
        assert _gauge(metrics, "optcli:kpi_breached", "latency_e2e_p95_ms") == 1
        assert _gauge(metrics, "optcli:kpi_value", "latency_e2e_p95_ms") > 1
        state = json.loads(_get(f"http://127.0.0.1:{port}/kpi"))
        row = next(r for r in state["kpis"] if r["kpi"] == "throughput_vs_baseline")
        assert row["value"] == pytest.approx(state["window"]["output_tok_s"] / 300.0)
        # 100 requests, a probe every 50: two probes (they finish after the requests that scheduled them)
        _until(lambda: _gauge(_get(f"http://127.0.0.1:{port}/metrics"), "optcli:kpi_accuracy_probes_total") == 2, 30)
        state = json.loads(_get(f"http://127.0.0.1:{port}/kpi"))
        probe = state["accuracy_probe"]
        assert probe["requests_counted"] == 100 and probe["reference_ppl"] > 1
        assert probe["last_ppl"] == pytest.approx(probe["reference_ppl"], rel=1e-3)  # same engine, same numerics
        # the load stopped: the 2 s window empties and the gate recovers
        _until(lambda: _gauge(_get(f"http://127.0.0.1:{port}/metrics"), "optcli:kpi_breached",
                              "latency_e2e_p95_ms") == 0, 10)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert len(re.findall(r"KPI latency_e2e_p95_ms breached: \S+ ms, must be <= 1 \(latency.p95_threshold", stderr)) == 1
    assert len(re.findall(r"KPI latency_e2e_p95_ms recovered", stderr)) == 1
    assert len(re.findall(r"KPI cost_budget_share breached", stderr)) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--monthly-budget", "100"], "only mean something with --kpi"),
    (["--kpi", "KPI"], "throughput.degradation_threshold, cost.increase_threshold compare(s) with a profile report: "
                       "pass --baseline-report"),
    (["--kpi", "KPI", "--baseline-report", "REPORT", "--gpu-hour-cost", "2"],
     "cost.budget_alert need(s) a monthly budget (USD): pass --monthly-budget"),
    (["--kpi", "KPI", "--baseline-report", "KPI", "--gpu-hour-cost", "2", "--monthly-budget", "9"],
     "cannot read a profile report.json"),
    (["--kpi", "KPI", "--engine", "vllm"], "optcli kpi rules FILE --engine vllm"),
    (["--kpi", "BAD"], "unknown field 'latency.alert_windw'"),
])
def test_bad_kpi_options_exit_2_before_loading(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "kpi.yaml").write_text(KPI)
    (tmp_path / "bad.yaml").write_text("latency: {alert_windw: 300}\n")
    (tmp_path / "report.json").write_text(json.dumps({"throughput": {"output_tok_s": 10.0}}))
    files = {"KPI": "kpi.yaml", "BAD": "bad.yaml", "REPORT": "report.json"}
    args = [str(tmp_path / files[a]) if a in files else a for a in args]
    result = subprocess.run([OPTCLI, "serve", "builtin:tiny-llama", "--port", str(_free_port()), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
