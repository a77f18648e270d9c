"""`roi --autoscale keda|hpa`: the scaler's threshold is the report's per-replica concurrency at its SLO-max-rate,
its bounds the load-trace replay's, and the YAML is what Kubernetes (and KEDA's documented structure) accepts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import missing, optcli


def _point(label: str, rate: float, p95: float, mean: float) -> dict:
    return {"label": label, "achieved_rate_requests_s": rate, "requests_s": rate, "e2e_p95_ms": p95,
            "latency_ms": {"e2e": {"mean": mean, "p95": p95}}}


def _report(tmp_path: Path) -> Path:
    # three sweep levels; the SLO (gates the profile's KPI file set) held up to the 8 req/s level
    sweep = [_point("synchronous", 2.0, 300, 250), _point("constant 8 req/s", 8.0, 900, 700),
             _point("throughput", 12.0, 4000, 3000)]
    best = {"requests_s": 8.0, "level": "constant 8 req/s", "e2e_p95_ms": 900, "concurrency": 8.0 * 0.7}
    report = {"model": "org/Llama-3-8B-w4a16", "workload": {"engine": {"name": "vllm"}, "output_len": 100},
              "throughput": {"output_tok_s": 1200.0, "total_tok_s": 1500.0, "requests_s": 12.0, "sweep": sweep,
                             "slo_max_rate": best},
              "cost": {"gpu_hour_cost_usd": 2.0}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return path


def _roi(*args: str) -> subprocess.CompletedProcess:
    return optcli("roi", *args, timeout=120)


def _validator():
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed (a test dependency)")
    return kubernetes_validate


def test_keda_threshold_is_the_reports_concurrency_at_the_slo_max_rate(tmp_path: Path) -> None:
    out = tmp_path / "scaler.yaml"
    result = _roi("--report", str(_report(tmp_path)), "--autoscale", "keda", "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    doc = yaml.safe_load(text)
    spec = doc["spec"]
    trigger = spec["triggers"][0]
    assert float(trigger["metadata"]["threshold"]) == pytest.approx(5.6)  # 8 req/s x 0.7 s in flight
    assert "threshold: 5.6 requests in flight per replica" in " ".join(result.stdout.split())
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 10)  # no trace: the flags, and it says so
    assert "--max-replicas (no --load-trace to replay)" in text
    # the report's engine was vLLM: its gauges, summed per replica
    assert trigger["metadata"]["query"] == ('sum(vllm:num_requests_running{model_name="org/Llama-3-8B-w4a16"} + '
                                            'vllm:num_requests_waiting{model_name="org/Llama-3-8B-w4a16"})')
    # KEDA's documented ScaledObject structure (keda.sh/v1alpha1), field by field
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("keda.sh/v1alpha1", "ScaledObject",
                                                                        "llama-3-8b-w4a16")
    assert spec["scaleTargetRef"]["name"] == "llama-3-8b-w4a16"
    assert set(spec) <= {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                         "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
    assert all(isinstance(spec[k], int) for k in ("minReplicaCount", "maxReplicaCount", "pollingInterval",
                                                  "cooldownPeriod"))
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert set(trigger["metadata"]) == {"serverAddress", "query", "threshold"}
    assert all(isinstance(v, str) for v in trigger["metadata"].values())  # KEDA's metadata is a string map
    # the article's scale-down rule in the HPA behavior KEDA passes on: one pod at a time, after 300 s lower load
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    # that behavior block against Kubernetes' own schema (it is an autoscaling/v2 HorizontalPodAutoscalerBehavior)
    k8s = _validator()
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": spec["scaleTargetRef"], "maxReplicas": 10, "behavior": behavior}}
    k8s.validate(hpa, k8s.latest_version(), strict=True)


def test_hpa_bounds_come_from_the_load_trace_replay_and_kubernetes_accepts_it(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("time,requests_per_s\n00:00,4\n06:00,20\n12:00,40\n18:00,10\n")
    out = tmp_path / "hpa.yaml"
    result = _roi("--report", str(_report(tmp_path)), "--load-trace", str(trace), "--p95-slo-ms", "1000",
                  "--autoscale", "hpa", "--out", str(out), "--serving-engine", "builtin", "--json")
    assert result.returncode == 0, result.stderr
    roi = json.loads(result.stdout)
    rows = roi["capacity"]["autoscaling"]["rows"]
    doc = yaml.safe_load(out.read_text())
    spec = doc["spec"]
    assert spec["minReplicas"] == min(r["replicas"] for r in rows)
    assert spec["maxReplicas"] == roi["capacity"]["autoscaling"]["peak_replicas"] > spec["minReplicas"]
    assert spec["metrics"][0]["pods"]["target"]["averageValue"] == "5600m"
    assert roi["autoscale"]["why"]["max replicas"].startswith(f"{spec['maxReplicas']} = the most the replay needed")
    assert "optcli:num_requests_running{<<.LabelMatchers>>}" in out.read_text()  # the adapter rule, builtin names
    k8s = _validator()
    k8s.validate(doc, k8s.latest_version(), strict=True)
    broken = {**doc, "spec": {**spec, "maxReplicas": "many"}}
    with pytest.raises(k8s.ValidationError):  # the validator is not vacuous
        k8s.validate(broken, k8s.latest_version(), strict=True)


def test_bad_autoscale_input_exits_2_and_keeps_the_users_files(tmp_path: Path) -> None:
    report = _report(tmp_path)
    before = report.read_text()
    no_slo = tmp_path / "no_slo.json"
    no_slo.write_text(json.dumps({**json.loads(before), "throughput": {
        **json.loads(before)["throughput"], "slo_max_rate": None}}))
    for args, message in (
        (["--report", str(report), "--autoscale", "keda"], "--autoscale needs --out FILE"),
        (["--report", str(report), "--autoscale", "knative", "--out", "x.yaml"], "--autoscale must be keda or hpa"),
        (["--autoscale", "keda", "--out", str(tmp_path / "s.yaml"), "--gpu", "H100-SXM"], "pass --report"),
        (["--report", str(report), "--autoscale", "keda", "--out", str(report)], "is not a scaler file optcli wrote"),
        (["--report", str(no_slo), "--autoscale", "keda", "--out", str(tmp_path / "s.yaml")], "--p95-slo-ms"),
        (["--report", str(report), "--out", str(tmp_path / "s.yaml")], "go with --autoscale"),
    ):
        result = _roi(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert report.read_text() == before and not (tmp_path / "s.yaml").exists()
