"""`optcli kpi rules`: the KPI file as Prometheus rules that Prometheus itself accepts (`promtool check rules`),
and that fire: a real Prometheus (Debian's package) scrapes `optcli serve`, load pushes p95 over a tiny
threshold, and the alert goes pending, then firing, through Prometheus' HTTP API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import OPTCLI, missing, optcli

ARTICLE = """\
latency:    {p95_threshold: 2000, p99_threshold: 3000, alert_window: 300}
throughput: {minimum: 100, degradation_threshold: 0.8}
cost:       {increase_threshold: 1.2, budget_alert: 0.9}
accuracy:   {acceptable_drop: 0.02, eval_frequency: 1000}
"""


def _binary(name: str) -> str:
    """Prometheus' binaries: skip where they are not installed, but fail under CI=true (.ci/run installs them)."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (apt-get install -y prometheus)")
    return path


def _optcli(*args: str) -> subprocess.CompletedProcess:
    return optcli(*args, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine", ["builtin", "vllm"])
def test_rules_for_the_articles_file_pass_promtool(tmp_path: Path, engine: str) -> None:
    promtool = _binary("promtool")
    kpi = tmp_path / "kpi.yaml"
    kpi.write_text(ARTICLE)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"throughput": {"output_tok_s": 900.0, "online_output_tok_s": 500.0}}))
    rules = tmp_path / "rules.yml"
    result = _optcli("kpi", "rules", str(kpi), "--engine", engine, "--out", str(rules), "--baseline-report",
                     str(report), "--gpu-hour-cost", "2", "--monthly-budget", "1000")
    assert result.returncode == 0, result.stderr
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    doc = yaml.safe_load(rules.read_text())
    alerts = {r["labels"]["kpi"]: r for r in doc["groups"][1]["rules"]}
    assert all(r["for"] == "300s" for r in alerts.values())  # for: = the file's alert_window
    assert alerts["latency_e2e_p95_ms"]["expr"].endswith("> 2")  # ms in the file, seconds in Prometheus
    assert alerts["throughput_vs_baseline"]["expr"].endswith("< 400")  # 0.8 x the profile's served 500 tok/s
    assert alerts["cost_budget_share"]["expr"].endswith(">= 900")  # 0.9 of the 1000 USD budget
    prefix = "vllm:" if engine == "vllm" else "optcli:"
    assert all(prefix in r["expr"] for r in doc["groups"][0]["rules"])
    assert ("accuracy_ppl_increase" in alerts) == (engine == "builtin")  # vLLM has no probe to alert on


def test_rules_refuse_to_overwrite_the_kpi_file(tmp_path: Path) -> None:
    kpi = tmp_path / "kpi.yaml"
    kpi.write_text(ARTICLE)
    result = _optcli("kpi", "rules", str(kpi), "--out", str(kpi))
    assert result.returncode == 2 and "is not a rules file optcli wrote" in result.stderr
    assert kpi.read_text() == ARTICLE
    result = _optcli("kpi", "rules", str(kpi), "--engine", "tgi", "--out", str(tmp_path / "r.yml"))
    assert result.returncode == 2 and "--engine must be builtin or vllm" in result.stderr


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _load(port: int, stop: threading.Event) -> None:
    body = json.dumps({"model": "builtin:tiny-llama", "prompt": "Once upon a time", "max_tokens": 8}).encode()
    while not stop.is_set():
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()


def test_prometheus_fires_the_p95_alert_against_optcli_serve(tmp_path: Path) -> None:
    prometheus = _binary("prometheus")
    kpi = tmp_path / "kpi.yaml"
    kpi.write_text("latency: {p95_threshold: 1, alert_window: 3}\n")  # 1 ms: every request misses it
    rules = tmp_path / "rules.yml"
    assert _optcli("kpi", "rules", str(kpi), "--out", str(rules)).returncode == 0
    serve_port, prom_port = _free_port(), _free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "optcli", "static_configs": [{"targets": [f"127.0.0.1:{serve_port}"]}]}],
    }))
    server = subprocess.Popen([OPTCLI, "serve", "builtin:tiny-llama", "--port", str(serve_port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    seen: list[str] = []
    try:
        assert "listening on" in server.stdout.readline()
        workers = [threading.Thread(target=_load, args=(serve_port, stop), daemon=True) for _ in range(2)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 30
        while "firing" not in seen:
            assert time.monotonic() < deadline, f"alert states seen: {seen}"
            time.sleep(0.5)
            try:
                alerts = _get_json(f"http://127.0.0.1:{prom_port}/api/v1/alerts")["data"]["alerts"]
            except OSError:
                continue  # Prometheus still starting
            seen += [a["state"] for a in alerts if a["labels"].get("alertname") == "OptcliKpiLatencyE2eP95Ms"
                     and (not seen or seen[-1] != a["state"])]
        assert seen[0] == "pending" and seen[-1] == "firing"  # held for the window (for: 3s) before firing
    finally:
        stop.set()
        for proc in (prom, server):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
