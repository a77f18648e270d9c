"""report.json as `ProfileReport`: reports written before the model existed (tests/data/reports, by
`optcli profile` at the commit before it, one per kind of run) load and save back to the same text, a bad
report is one line naming its field, and profile still writes exactly the fields those reports have
(scripts read them: DESIGN.md's report.json contract)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from helpers import OPTCLI, shared_data

from optcli.errors import UsageError
from optcli.schema import ProfileReport

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reports"
KINDS = ("baseline_accuracy", "rate_sweep", "kpi", "endpoint", "vllm")
SMALL = ["--requests", "4", "--prompt-len", "8:16", "--output-len", "6", "--concurrency", "2", "--device", "cpu"]
LENIENT_KPI = ("min_output_tok_s: 0.001\np99_e2e_ms_max: 600000\nmax_kld_mean: 0.5\n"
               "latency: {p95_threshold: 600000, p99_threshold: 600000}\n"
               "throughput: {minimum: 0.001, degradation_threshold: 0.01}\ncost: {increase_threshold: 100}\n"
               "accuracy: {acceptable_drop: 0.5}\n")
# what the machine decides (which kernel runs each layer kind and batch bucket): its keys are not the contract
OPAQUE = ("workload.engine.kernels", "workload.engine.baseline_kernels")


def field_paths(node, path: str = "", out: dict | None = None) -> dict[str, str]:
    """{field path: kind} of a report: objects by key, list items merged under `[]`; kinds null, number
    (int or float: a median may land on either), string, bool, list, object."""
    out = {} if out is None else out
    if isinstance(node, dict) and path not in OPAQUE:
        out[path] = out.get(path) or "object"
        for key, value in node.items():
            field_paths(value, f"{path}.{key}" if path else key, out)
    elif isinstance(node, list):
        out[path] = "list"
        for item in node:  # a list of objects: their fields (a list of strings or numbers is just a list)
            if isinstance(item, dict | list):
                field_paths(item, f"{path}[]", out)
    else:
        kind = ("null" if node is None else "bool" if isinstance(node, bool) else "number"
                if isinstance(node, int | float) else "string" if isinstance(node, str) else "object")
        if out.get(path) in (None, "null"):
            out[path] = kind
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_a_report_loads_and_saves_back_to_the_same_text(kind: str, tmp_path: Path) -> None:
    source = REFERENCE / f"{kind}.json"
    report = ProfileReport.load(source)
    assert report.to_json() == source.read_text(encoding="utf-8")
    saved = report.save(tmp_path / "report.json")
    assert saved.read_text(encoding="utf-8") == source.read_text(encoding="utf-8")
    assert not [p for p in tmp_path.iterdir() if p.name != "report.json"]  # no temporary left beside it


def test_the_model_reads_the_fields_readers_use() -> None:
    report = ProfileReport.load(REFERENCE / "baseline_accuracy.json")
    raw = json.loads((REFERENCE / "baseline_accuracy.json").read_text())
    assert report.throughput.total_tok_s == raw["throughput"]["total_tok_s"] > 0
    assert report.latency_ms.ttft.p95 == raw["latency_ms"]["ttft"]["p95"]
    assert isinstance(report.memory.weights_bytes, int)
    assert report.comparison.rows[0].field == raw["comparison"]["rows"][0]["field"]
    assert report.workload.engine.dtype == raw["workload"]["engine"]["dtype"]
    # an engine option the model does not declare rides along (a new EngineConfig field needs no edit here)
    assert report.workload.engine.get("max_num_seqs") == raw["workload"]["engine"]["max_num_seqs"]


def test_unknown_fields_survive_a_round_trip() -> None:
    raw = json.loads((REFERENCE / "endpoint.json").read_text())
    raw["from_a_script"] = {"note": 1}
    raw["throughput"]["new_figure"] = 2.5
    assert ProfileReport.model_validate(raw).to_dict() == raw


@pytest.mark.parametrize(("change", "needle"), [
    (lambda r: r["throughput"].update(total_tok_s="fast"), "field 'throughput.total_tok_s': expected a number"),
    (lambda r: r["kpi"]["checks"].append({"passed": "yes"}), "field 'kpi.checks.0.passed'"),
    (lambda r: r["latency_ms"].update(ttft=[1, 2]), "field 'latency_ms.ttft'"),
])
def test_a_bad_report_is_one_line_naming_the_field(change, needle: str, tmp_path: Path) -> None:
    raw = json.loads((REFERENCE / "endpoint.json").read_text())
    change(raw)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(UsageError) as info:
        ProfileReport.load(path)
    assert needle in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(("text", "needle"), [("[1, 2]", "expected a JSON object"), ("{", "not valid JSON")])
def test_not_a_report_is_one_line(text: str, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=needle):
        ProfileReport.load(path, "--baseline-report")


def test_roi_refuses_a_bad_report_in_one_line(tmp_path: Path) -> None:
    raw = json.loads((REFERENCE / "endpoint.json").read_text())
    raw["latency_ms"]["e2e"]["p95"] = "slow"
    path = tmp_path / "report.json"
    path.write_text(json.dumps(raw))
    result = subprocess.run([OPTCLI, "roi", "--report", str(path), "--gpu-hour-cost", "1"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert "field 'latency_ms.e2e.p95': expected a number" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- profile writes the same fields as before -----------------------------------------------------------


def _profile(*args: str, env: dict | None = None) -> dict:
    result = subprocess.run([OPTCLI, "profile", *args, "--json"], capture_output=True, text=True, timeout=900,
                            env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _endpoint_run(model: Path, eval_text: Path) -> dict:
    port = _free_port()
    server = subprocess.Popen([OPTCLI, "serve", str(model), "--port", str(port), "--device", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "optcli serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        return _profile(str(model), "--endpoint", f"http://127.0.0.1:{port}", "--baseline", str(model),
                        "--eval-text", str(eval_text), *SMALL[:6], "--concurrency", "1,2")
    finally:
        server.terminate()
        server.wait(30)


def _vllm_run(model: Path, tmp_path: Path) -> dict:
    """`--engine vllm` with a fake `vllm` on PATH that hands the flags it understands to `optcli serve`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vllm"
    fake.write_text("#!/usr/bin/env python3\nimport os, sys\nargv = sys.argv[1:]\n"
                    "flags = dict(zip(argv[2::2], argv[3::2]))\n"
                    "keep = ['--host', '--port', '--served-model-name', '--max-num-seqs', '--max-model-len']\n"
                    "args = [a for k in keep if k in flags for a in (k, flags[k])]\n"
                    f"os.execv({OPTCLI!r}, [{OPTCLI!r}, 'serve', argv[1], *args, '--device', 'cpu'])\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return _profile(str(model), "--baseline", str(model), "--engine", "vllm", "--requests", "4", "--prompt-len",
                    "8:16", "--output-len", "4", "--concurrency", "2", env=env)


def _run(kind: str, model: Path, tmp_path: Path) -> dict:
    """The same command the reference report of `kind` was written by."""
    sample = shared_data("tinystories_train_sample.txt")
    eval_text = tmp_path / "eval.txt"
    eval_text.write_bytes(sample.read_bytes()[:4000])
    kpi = tmp_path / "kpi.yaml"
    kpi.write_text(LENIENT_KPI)
    accuracy = ["--baseline", str(model), "--eval-text", str(eval_text), *SMALL]
    if kind == "baseline_accuracy":
        return _profile(str(model), *accuracy, "--gpu-hour-cost", "2.5", "--export", str(tmp_path / "rows.jsonl"))
    if kind == "rate_sweep":
        return _profile(str(model), *SMALL[:6], "--rate", "sweep:3", "--device", "cpu", "--repeats", "1")
    if kind == "kpi":
        return _profile(str(model), *accuracy, "--kpi", str(kpi), "--lm-head", "int8")
    if kind == "endpoint":
        return _endpoint_run(model, eval_text)
    return _vllm_run(model, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_profile_writes_the_fields_it_wrote_before(kind: str, stories_dir: Path, tmp_path: Path) -> None:
    before = field_paths(json.loads((REFERENCE / f"{kind}.json").read_text()))
    after = field_paths(_run(kind, stories_dir, tmp_path))
    assert sorted(set(after) - set(before)) == [] and sorted(set(before) - set(after)) == []
    changed = {p: (before[p], after[p]) for p in before if "null" not in (before[p], after[p]) and before[p] != after[p]}
    assert not changed, changed
