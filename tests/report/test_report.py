"""Profile reports: KPI gates, Markdown/HTML rendering (incl. a headless Chromium render), atomic writes."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from helpers import missing

from optcli.bench.kpi import evaluate_kpis, load_kpi, slo_from_kpi
from optcli.errors import UsageError
from optcli.report import write_reports
from optcli.report.html import render_html
from optcli.report.markdown import render_markdown

PNG_SIG = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")


def example_report() -> dict:
    """A realistic W4A16 profile on one GPU; itl p99, gpu_utilization and cost were not measurable."""
    return {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "baseline": "meta-llama/Llama-3.1-8B-Instruct (bf16)",
        "recipe": "w4a16-gptq",
        "hardware": {"gpu": "NVIDIA H100 80GB HBM3", "count": 1},
        "workload": {"prompts": 256, "input_len": 512, "output_len": 128, "concurrency": 16},
        "throughput": {"output_tok_s": 2841.7, "total_tok_s": 14208.5, "requests_s": 22.2},
        "latency_ms": {
            "ttft": {"mean": 84.3, "p50": 71.9, "p95": 163.2, "p99": 241.8},
            "tpot": {"mean": 11.6, "p50": 11.2, "p95": 14.9, "p99": 17.3},
            "itl": {"mean": 11.4, "p50": 10.8, "p95": 15.1, "p99": None},
            "e2e": {"mean": 1557.0, "p50": 1490.2, "p95": 2011.6, "p99": 2380.4},
        },
        "memory": {"weights_bytes": 5_703_204_864, "peak_bytes": 9_126_805_504, "kv_cache_bytes": None},
        "accuracy": {"ppl": 7.412, "baseline_ppl": 7.215, "ppl_ratio": 1.0273, "kld_mean": 0.0418,
                     "kld_p99": 0.3127, "top1_agreement": 0.9312},
        "batch_efficiency": 0.87,
        "gpu_utilization": None,
        "cost": {"usd_per_1k_tokens": None},
        "kpi": {"passed": True, "checks": []},
        "versions": {"optcli": "0.1.0", "torch": "2.13.0"},
    }


def baseline_report() -> dict:
    r = example_report()
    r.update(recipe="none", throughput={"output_tok_s": 1980.4, "total_tok_s": 9902.0, "requests_s": 15.5},
             memory={"weights_bytes": 16_060_522_496, "peak_bytes": 19_327_352_832, "kv_cache_bytes": None},
             accuracy={"ppl": 7.215, "baseline_ppl": 7.215, "ppl_ratio": 1.0, "kld_mean": 0.0, "kld_p99": 0.0,
                       "top1_agreement": 1.0})
    return r


def compared_report() -> dict:
    """example_report with its source measured the same way: slower offline and at batch 1, faster online."""
    from optcli.bench.comparison import comparison as _comparison
    from optcli.bench.comparison import roofline as _roofline
    from optcli.bench.workload import Workload

    report, source = example_report(), baseline_report()
    report["throughput"].update(online_output_tok_s=2500.0, decode_tok_s=180.0)
    source["throughput"].update(output_tok_s=6766.0, online_output_tok_s=2000.0, decode_tok_s=200.0)
    report["comparison"] = _comparison(report, source, Workload(requests=256, concurrency=16))
    report["roofline"] = _roofline({"gbs": 3350.0, "source": "catalog: H100-80GB"}, report, source)
    return report


SAMPLES = {
    "candidate": {"ttft": [60.0 + 2.5 * i for i in range(60)], "tpot": [10.0 + 0.1 * i for i in range(60)],
                  "itl": [9.0 + 0.12 * i for i in range(60)], "e2e": [1300.0 + 15 * i for i in range(60)]},
    "baseline": {"ttft": [80.0 + 3 * i for i in range(60)], "tpot": [14.0 + 0.1 * i for i in range(60)],
                 "itl": [], "e2e": [1700.0 + 20 * i for i in range(60)]},
}
SWEEP = [(1, 210.5), (2, 405.0), (4, 790.2), (8, 1490.8), (16, 2841.7), (32, None)]
ALTS = ("latency CDF", "baseline vs candidate", "throughput vs concurrency")


def write_kpi(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kpi.yaml"
    path.write_text(text)
    return path


# --- KPI gates ---------------------------------------------------------------------------------------


def test_lenient_kpis_pass(tmp_path):
    kpi = load_kpi(write_kpi(tmp_path, "p95_ttft_ms_max: 500\np99_e2e_ms_max: 5000\nmin_output_tok_s: 1000\n"
                                       "max_ppl_ratio: 1.05\nmin_top1_agreement: 0.9\nmax_peak_memory_bytes: 4e10\n"))
    result = evaluate_kpis(example_report(), kpi)
    assert result["passed"] is True
    assert len(result["checks"]) == 6 and all(c["passed"] for c in result["checks"])
    by_name = {c["name"]: c for c in result["checks"]}
    assert by_name["p95_ttft_ms <= 500 (p95_ttft_ms_max)"]["value"] == 163.2
    assert by_name["output_tok_s >= 1000 (min_output_tok_s)"]["threshold"] == 1000
    assert slo_from_kpi(kpi) == {"ttft_ms": 500, "e2e_ms": 5000}


def test_impossible_kpi_fails_and_names_the_check(tmp_path):
    kpi = load_kpi(write_kpi(tmp_path, "p95_ttft_ms_max: 500\np95_tpot_ms_max: 1\n"))
    result = evaluate_kpis(example_report(), kpi)
    assert result["passed"] is False
    failed = [c for c in result["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["p95_tpot_ms <= 1 (p95_tpot_ms_max)"]
    assert failed[0]["value"] == 14.9


def test_unmeasured_value_fails_its_gate(tmp_path):
    kpi = load_kpi(write_kpi(tmp_path, "p99_itl_ms_max: 1000000\nmax_usd_per_1k_tokens: 100\n"))
    result = evaluate_kpis(example_report(), kpi)
    assert result["passed"] is False
    assert [(c["value"], c["passed"]) for c in result["checks"]] == [(None, False), (None, False)]


SEED_KPIS = """\
latency: {p95_threshold: %s, p99_threshold: %s}
throughput: {minimum: %s, degradation_threshold: %s}
cost: {increase_threshold: %s}
accuracy: {acceptable_drop: %s, min_task_recovery: %s}
"""


def tasks_report() -> dict:
    """compared_report with two task metrics measured for both models."""
    report = compared_report()
    report["accuracy"]["tasks"] = [
        {"task": "arc_easy", "metric": "acc", "candidate": 0.70, "baseline": 0.72, "recovery": 0.70 / 0.72},
        {"task": "hellaswag", "metric": "acc_norm", "candidate": 0.55, "baseline": 0.55, "recovery": 1.0},
    ]
    return report


def test_the_seed_kpis_shape_gates_against_the_baseline(tmp_path):
    """The seed's nested KPIS dict as YAML: absolute gates, and relative ones against the source measured in
    the same run; every check names its threshold, value and the baseline's value."""
    lenient = load_kpi(write_kpi(tmp_path, SEED_KPIS % (5000, 8000, 100, 0.1, 10, 0.05, 0.9)))
    assert lenient.relative_gates() == ["throughput.degradation_threshold", "cost.increase_threshold",
                                        "accuracy.acceptable_drop", "accuracy.min_task_recovery"]
    report = tasks_report()
    result = evaluate_kpis(report, lenient)
    assert result["passed"] is True, result
    by_name = {c["name"].split(" (")[-1].rstrip(")"): c for c in result["checks"]}
    assert by_name["latency.p95_threshold"]["value"] == 2011.6  # E2E unless latency.metric says otherwise
    degradation = by_name["throughput.degradation_threshold"]
    assert degradation["baseline"] == 6766.0 and degradation["value"] == pytest.approx(2841.7 / 6766.0)
    cost = by_name["cost.increase_threshold"]  # cost per token scales as 1 / total tok/s on the same machine
    assert cost["value"] == pytest.approx(9902.0 / 14208.5) and cost["baseline"] == 9902.0
    drops = [c for c in result["checks"] if "acceptable_drop" in c["name"]]
    assert [round(c["value"], 6) for c in drops] == [0.02, 0.0] and drops[0]["baseline"] == 0.72
    assert all(set(c) == {"name", "threshold", "value", "baseline", "passed"} for c in result["checks"])

    strict = load_kpi(write_kpi(tmp_path, SEED_KPIS % (1, 1, 1e9, 0.99, 0.5, 0.001, 0.99)))
    failed = {c["name"].split(" (")[-1].rstrip(")") for c in evaluate_kpis(report, strict)["checks"] if not c["passed"]}
    assert failed == {"latency.p95_threshold", "latency.p99_threshold", "throughput.minimum",
                      "throughput.degradation_threshold", "cost.increase_threshold", "accuracy.acceptable_drop",
                      "accuracy.min_task_recovery"}


def test_seed_accuracy_gates_without_tasks_use_perplexity_and_fail_on_no_task(tmp_path):
    kpi = load_kpi(write_kpi(tmp_path, "accuracy: {acceptable_drop: 0.05, min_task_recovery: 0.9}\n"
                                       "latency: {metric: ttft, p99_threshold: 300}\n"))
    checks = evaluate_kpis(compared_report(), kpi)["checks"]
    ppl = next(c for c in checks if "acceptable_drop" in c["name"])
    assert ppl["value"] == pytest.approx(0.0273) and ppl["passed"] and ppl["baseline"] == 7.215
    recovery = next(c for c in checks if "min_task_recovery" in c["name"])
    assert recovery["value"] is None and not recovery["passed"]  # a gate with nothing to gate fails
    assert next(c for c in checks if "p99_threshold" in c["name"])["value"] == 241.8
    assert slo_from_kpi(kpi) == {"ttft_ms": 300}


@pytest.mark.parametrize(("text", "needle"), [
    ("latency: {p95_treshold: 500}\n", "latency.p95_treshold"),
    ("throughput: {minimum: true}\n", "throughput.minimum"),
    ("latency: {metric: p95}\n", "latency.metric"),
    ("p95_ttft_ms_maxx: 500\n", "p95_ttft_ms_maxx"),
    ("min_output_tok_s: fast\n", "min_output_tok_s"),
    ("max_ppl_ratio: true\n", "max_ppl_ratio"),
])
def test_bad_kpi_file_is_a_one_line_usage_error(tmp_path, text, needle):
    path = write_kpi(tmp_path, text)
    with pytest.raises(UsageError) as exc:
        load_kpi(path)
    msg = str(exc.value)
    assert str(path) in msg and needle in msg and "p95_ttft_ms_max" in msg and "\n" not in msg


def test_missing_or_invalid_kpi_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="nope.yaml"):
        load_kpi(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match="invalid YAML"):
        load_kpi(write_kpi(tmp_path, "p95_ttft_ms_max: [500\n"))


# --- Markdown / HTML ---------------------------------------------------------------------------------


def report_with_kpis(tmp_path: Path) -> dict:
    report = example_report()
    kpi = load_kpi(write_kpi(tmp_path, "p95_ttft_ms_max: 500\np95_tpot_ms_max: 1\np99_itl_ms_max: 50\n"))
    report["kpi"] = evaluate_kpis(report, kpi)
    return report


def test_markdown_shows_numbers_units_and_na(tmp_path):
    md = render_markdown(report_with_kpis(tmp_path))
    for text in ("meta-llama/Llama-3.1-8B-Instruct", "w4a16-gptq", "2,841.7", "163.2", "241.8", "1.027",
                 "0.9312", "(ms)", "(tok/s)", "(GiB)", "5.31", "8.50"):
        assert text in md, text
    itl_row = next(line for line in md.splitlines() if line.startswith("| itl "))
    assert itl_row.rstrip(" |").endswith("n/a")  # itl p99 was not measured
    assert "USD / 1k tokens" in md and md.count("n/a") >= 4
    assert "✅ | p95_ttft_ms <= 500" in md and "❌ | p95_tpot_ms <= 1" in md and "❌ | p99_itl_ms <= 50" in md
    assert "❌ failed" in md


def test_renderers_survive_an_all_null_report():
    report = {k: None for k in example_report()}
    md = render_markdown(report)
    html = render_html(report, samples={"ttft": [], "e2e": None}, sweep=[(1, None)], baseline_report=report)
    assert "n/a" in md and "n/a" in html
    assert "0.0" not in md  # nothing invented


def test_source_vs_artifact_table_warnings_and_roofline_in_md_and_html():
    report = compared_report()
    assert report["comparison"]["warnings"] == [
        "w4a16-gptq: 0.42x its source's output tok/s at 256 requests (offline)",
        "w4a16-gptq: 0.90x its source's decode tok/s at batch 1",
    ]  # total tok/s 14,208.5 vs 9,902 and online 2,500 vs 2,000 were faster
    md = render_markdown(report)
    assert "> [!WARNING]" in md
    for warning in report["comparison"]["warnings"]:
        assert f"> - {warning}" in md
    for row in ("| output tok/s (offline) | 6,766.0 | 2,841.7 | 0.42x |", "| output tok/s (online) | 2,000.0 | 2,500.0 | 1.25x |",
                "| decode tok/s (batch 1) | 200 | 180 | 0.90x |", "| TTFT p95 (ms) | 163.2 | 163.2 | 1.00x |",
                "| weights (GiB) | 14.96 | 5.31 | 0.36x |"):
        assert row in md, row
    line = ("roofline (batch-1 decode): artifact 1,027 GB/s = 31% of 3,350 GB/s peak (catalog: H100-80GB); "
            "source 3,212 GB/s = 96%")
    assert line in md
    html = render_html(report)
    assert '<div class="warn" role="alert">' in html and "0.42x its source&#x27;s output tok/s" in html
    assert "<h2>Source vs artifact</h2>" in html and "<td>output tok/s (offline)</td><td>6,766.0</td>" in html
    assert line in html
    assert html.index('class="warn"') < html.index("<h2>KPI</h2>")  # seen first, not below the fold


def repeated_report() -> dict:
    """compared_report measured in 3 interleaved repeats on a busy machine: offline 1.22x its source in
    every pair, online within noise, TTFT p50 lower (the faster side of a latency)."""
    from optcli.bench.comparison import comparison as _comparison
    from optcli.bench.workload import Workload

    report, source = example_report(), baseline_report()
    drift = (1.0, 0.8, 0.9)
    base_runs = [{"throughput.output_tok_s": 2000.0 * d, "throughput.total_tok_s": 10000.0 * d,
                  "throughput.online_output_tok_s": 1500.0 * d, "latency_ms.ttft.p50": 80.0 / d} for d in drift]
    runs = [{"throughput.output_tok_s": 2440.0 * d * e, "throughput.total_tok_s": 12200.0 * d * e,
             "throughput.online_output_tok_s": 1500.0 * d * n, "latency_ms.ttft.p50": 60.0 / d * e}
            for d, e, n in zip(drift, (1.0, 1.01, 0.99), (1.2, 0.85, 1.0), strict=True)]
    for figures, rows in ((report, runs), (source, base_runs)):
        for field in rows[0]:
            section, *keys = field.split(".")
            node = figures.setdefault(section, {})
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = statistics.median(r[field] for r in rows)
    report["hardware"] = {"device": "cpu", "contention": {
        "busy_share": 0.48, "steal_share": 0.0,
        "warning": "another process used 48% of the CPU during this run: absolute figures are low, ratios are interleaved"}}
    report["comparison"] = _comparison(report, source, Workload(requests=256, concurrency=16),
                                       runs={"value": runs, "baseline": base_runs})
    return report


def test_intervals_verdicts_and_a_busy_machine_in_md_and_html(tmp_path):
    report = repeated_report()
    rows = {r["field"]: r for r in report["comparison"]["rows"]}
    offline, online, ttft = rows["throughput.output_tok_s"], rows["throughput.online_output_tok_s"], rows["latency_ms.ttft.p50"]
    assert offline["ratio"] == pytest.approx(1.22) and offline["repeats"] == 3  # the median pair
    assert 1 < offline["ci_low"] < 1.22 < offline["ci_high"] < 1.3 and offline["verdict"] == "faster"
    assert online["ci_low"] < 1 < online["ci_high"] and online["verdict"] == "no measurable difference"
    assert ttft["ratio"] == pytest.approx(0.75) and ttft["ci_high"] < 1 and ttft["verdict"] == "faster"
    md, html = render_markdown(report), render_html(report)
    cell = f"{offline['ratio']:.2f}x [{offline['ci_low']:.2f}, {offline['ci_high']:.2f}]"
    assert f"| output tok/s (offline) | 1,800.0 | 2,174.0 | {cell} | faster |" in md
    assert re.search(r"\| output tok/s \(online\) \| [\d,.]+ \| [\d,.]+ \| \d\.\d+x \[0\.\d+, 1\.\d+\] \| "
                     r"no measurable difference \|", md)
    assert f"<td>{cell}</td><td>faster</td>" in html and "<td>no measurable difference</td>" in html
    assert "medians of 3 interleaved repeats" in md and "medians of 3 interleaved repeats" in html
    busy = report["hardware"]["contention"]["warning"]
    assert f"> **Busy machine:** {busy}" in md and f"Busy machine:</strong> {busy}" in html
    assert report["comparison"]["warnings"] == []  # nothing measurably slower: no 'slower' warning
    # a relative gate compares the median ratio and shows its interval
    kpi = load_kpi(write_kpi(tmp_path, "throughput: {degradation_threshold: 1.2}\ncost: {increase_threshold: 0.8}\n"))
    report["kpi"] = evaluate_kpis(report, kpi)
    degradation, cost = report["kpi"]["checks"]
    assert degradation["value"] == offline["ratio"] and degradation["passed"]
    assert (degradation["ci_low"], degradation["ci_high"]) == (offline["ci_low"], offline["ci_high"])
    total = rows["throughput.total_tok_s"]
    assert cost["value"] == pytest.approx(1 / total["ratio"]) and cost["ci_low"] == pytest.approx(1 / total["ci_high"])
    md = render_markdown(report)
    assert f"| {degradation['value']:.4g} [{offline['ci_low']:.3g}, {offline['ci_high']:.3g}] |" in md


def test_no_source_no_comparison_and_no_warning():
    report = example_report()
    md, html = render_markdown(report), render_html(report)
    assert "Source vs artifact" not in md and "Source vs artifact" not in html
    assert "[!WARNING]" not in md and 'class="warn"' not in html and "roofline" not in md


def embedded_pngs(html: str) -> dict[str, bytes]:
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', html)
    return {alt: base64.b64decode(data, validate=True) for alt, data in imgs}


def test_html_is_self_contained_with_decodable_plots(tmp_path):
    html = render_html(report_with_kpis(tmp_path), samples=SAMPLES, sweep=SWEEP, baseline_report=baseline_report())
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', html, re.I)
    assert "<link" not in html and "<script" not in html and "@import" not in html
    pngs = embedded_pngs(html)
    assert sorted(pngs) == sorted(ALTS)
    for alt, png in pngs.items():
        assert png.startswith(PNG_SIG), alt
        assert len(png) > 10_000, (alt, len(png))  # a real matplotlib figure, not an empty canvas
    assert 'class="fail"' in html and 'class="pass"' in html and "p95_tpot_ms &lt;= 1" in html


def test_html_plots_only_what_was_given():
    assert embedded_pngs(render_html(example_report())) == {}
    assert list(embedded_pngs(render_html(example_report(), sweep=SWEEP))) == ["throughput vs concurrency"]


# --- write_reports -----------------------------------------------------------------------------------


def test_write_reports_writes_three_files_and_json_round_trips(tmp_path):
    report = report_with_kpis(tmp_path)
    out = tmp_path / "run" / "out"
    paths = write_reports(report, out, samples=SAMPLES["candidate"], sweep=SWEEP)
    assert set(paths) == {"json", "md", "html"} and all(p.parent == out for p in paths.values())
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    assert json.loads(paths["json"].read_text()) == report
    assert paths["json"].read_text() == json.dumps(report, indent=2) + "\n"
    assert not [p for p in out.parent.iterdir() if p.name != "out"]  # no temp directory left behind

    (out / "model.safetensors").write_bytes(b"keep me")
    changed = copy.deepcopy(report)
    changed["throughput"]["output_tok_s"] = 3000.5
    write_reports(changed, out)
    assert (out / "model.safetensors").read_bytes() == b"keep me"
    assert json.loads((out / "report.json").read_text()) == changed
    assert "3,000.5" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.html", "report.json", "report.md"]


# --- headless browser --------------------------------------------------------------------------------


def chromium_or_skip() -> Path:
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    return CHROMIUM


def test_html_renders_in_headless_chromium(tmp_path):
    chromium = chromium_or_skip()
    report = {**report_with_kpis(tmp_path), **{k: compared_report()[k] for k in ("comparison", "roofline")}}
    paths = write_reports(report, tmp_path / "out", samples=SAMPLES, sweep=SWEEP, baseline_report=baseline_report())
    shot = tmp_path / "shot.png"
    base = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage"]
    url = paths["html"].resolve().as_uri()
    env = {**os.environ, "HOME": str(tmp_path)}  # keep chromium's config/crash dirs out of the real home
    try:
        dom = subprocess.run([*base, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=60, env=env)
        subprocess.run([*base, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}",
                        "--window-size=1200,2000", "--hide-scrollbars", url],
                       capture_output=True, timeout=60, env=env)
    finally:
        shutil.rmtree(tmp_path / "profile-dom", ignore_errors=True)
        shutil.rmtree(tmp_path / "profile-shot", ignore_errors=True)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = set(re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', dom.stdout))
    assert rendered == set(ALTS), dom.stdout[:500]
    assert "p95_tpot_ms &lt;= 1" in dom.stdout
    assert '<div class="warn" role="alert">' in dom.stdout and "<h2>Source vs artifact</h2>" in dom.stdout
    png = shot.read_bytes()
    assert png.startswith(PNG_SIG) and len(png) > 50_000, len(png)


def test_report_md_names_kernels_in_one_line_not_their_reasons():
    """report.json keeps every layer's kernel per bucket with its rule; the Markdown header says only which
    kernel runs where (the reasons ran to pages)."""
    from optcli.report.markdown import kernel_summary

    pick = lambda k: {"kernel": k, "reason": "a long rule " * 40}  # noqa: E731
    kernels = {"qkv": {"buckets": {"1": pick("q4-vnni"), "2-4": pick("q4-vnni")}},
               "lm_head": {"buckets": {"1": pick("bf16-dpbf16"), "2-4": pick("bf16-dpbf16"), "5-16": pick("onednn-bf16")}}}
    assert kernel_summary(kernels) == "qkv q4-vnni (all), lm_head bf16-dpbf16 (1..2-4) / onednn-bf16 (5-16)"
