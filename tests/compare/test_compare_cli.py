"""`optcli compare` as a CI job uses it: bad input is exit 2 before any work; a run writes the methods table
(every row's fields) and DIR/best; a second run reuses the cached artifacts; a KPI only some candidates pass
picks the best passer (exit 0); an impossible one is exit 3 naming each candidate's failing gate. Tiny model,
few requests: the figures are not the point here, the contract is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

OPTCLI = str(Path(sys.executable).parent / "optcli")
SMALL = ["--requests", "2", "--prompt-len", "8:12", "--output-len", "3", "--concurrency", "2", "--repeats", "2"]
RECIPES = "w4a16-rtn,fp8-dynamic"
ROW_FIELDS = {"method", "artifact", "bits_per_weight", "accuracy", "speedup", "memory_reduction", "usd_per_1k_tokens",
              "best_for", "kpi"}


def optcli(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPTCLI_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([OPTCLI, *args], capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("optcli-cache")


@pytest.fixture(scope="module")
def first(stories_dir: Path, cache: Path, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("cmp") / "out"
    result = optcli(cache, "compare", str(stories_dir), "--recipes", RECIPES, "--out", str(out),
                    "--gpu-hour-cost", "2", "--json", *SMALL)
    return result, out


@pytest.mark.parametrize(("args", "needle"), [
    (["--recipes", "w4a16-rtn,no-such-recipe"], "no-such-recipe"),
    (["--recipes", "w4a16-rtn,w4a16-rtn"], "more than once"),
    (["--recipes", "w4a16-rtn", "--objective", "speed"], "--objective"),
    ([], "--recipes"),
    (["--recipes", "w4a16-rtn", "--optimizations"], "--optimizations"),
    (["--recipes", "w4a16-rtn", "--kpi", "/no/such/kpi.yaml"], "kpi.yaml"),
    (["--recipes", "w4a16-rtn", "--gpu-hour-cost", "-1"], "--gpu-hour-cost"),
    (["--optimizations", "--recipe", "nope"], "nope"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_work(stories_dir: Path, tmp_path: Path, args, needle) -> None:
    result = optcli(tmp_path / "cache", "compare", str(stories_dir), *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # nothing quantized or written


def test_the_methods_table_has_every_field_for_source_and_each_recipe(first) -> None:
    result, out = first
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["method"] for r in report["rows"]] == ["source", "w4a16-rtn", "fp8-dynamic"]
    for row in report["rows"]:
        assert ROW_FIELDS <= set(row)
        for figure in ("batch1", "load"):
            assert {"ratio", "ci_low", "ci_high"} <= set(row["speedup"][figure])
    source, *artifacts = report["rows"]
    for row in artifacts:
        assert row["bits_per_weight"] < source["bits_per_weight"]  # counted from the artifact's own bytes
        assert row["accuracy"]["kld_mean"] > 0 and 0 < row["accuracy"]["top1_agreement"] <= 1
        assert row["speedup"]["batch1"]["ci_low"] <= row["speedup"]["batch1"]["ratio"] <= row["speedup"]["batch1"]["ci_high"]
        assert row["usd_per_1k_tokens"] > 0 and 0 < row["memory_reduction"]["weights"] < 1
    assert any(row["best_for"] for row in artifacts)
    assert report["best"] in ("w4a16-rtn", "fp8-dynamic") and report["cache"]["quantized"] == sorted(RECIPES.split(","))
    for name in ("report.json", "report.md", "report.html", "pareto.png"):
        assert (out / name).is_file()
    best = json.loads((out / "best" / "optcli.json").read_text())
    assert best["recipe"]["name"] == report["best"]


def test_a_second_run_reuses_the_artifacts_and_a_kpi_some_pass_picks_a_passer(first, stories_dir: Path, cache: Path,
                                                                                tmp_path: Path) -> None:
    result, _ = first
    rows = {r["method"]: r for r in json.loads(result.stdout)["rows"][1:]}
    closer, farther = sorted(rows, key=lambda m: rows[m]["accuracy"]["kld_mean"])
    threshold = (rows[closer]["accuracy"]["kld_mean"] + rows[farther]["accuracy"]["kld_mean"]) / 2
    kpi = tmp_path / "kpi.yaml"
    kpi.write_text(f"max_kld_mean: {threshold}\n")
    out = tmp_path / "out"
    again = optcli(cache, "compare", str(stories_dir), "--recipes", RECIPES, "--kpi", str(kpi), "--objective",
                   "memory", "--out", str(out), "--json", *SMALL)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["cache"]["reused"] == RECIPES.split(",") and report["cache"]["quantized"] == []
    verdicts = {r["method"]: r["kpi"]["passed"] for r in report["rows"][1:]}
    assert verdicts == {closer: True, farther: False}
    assert report["best"] == closer
    assert json.loads((out / "best" / "optcli.json").read_text())["recipe"]["name"] == closer


def test_an_impossible_kpi_is_exit_3_naming_each_candidates_failing_gate(first, stories_dir: Path, cache: Path,
                                                                         tmp_path: Path) -> None:
    kpi = tmp_path / "kpi.yaml"
    kpi.write_text("min_output_tok_s: 1.0e12\nmax_kld_mean: 0.0\n")
    result = optcli(cache, "compare", str(stories_dir), "--recipes", RECIPES, "--kpi", str(kpi), "--out",
                    str(tmp_path / "out"), "--json", *SMALL)
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["best"] is None and not (tmp_path / "out" / "best").exists()
    line = result.stderr.strip().splitlines()[-1]
    per_candidate = dict(part.split(": ", 1) for part in line.split("KPI gates: ", 1)[1].split("; "))
    assert set(per_candidate) == set(RECIPES.split(","))
    for gates in per_candidate.values():
        assert "min_output_tok_s" in gates and "max_kld_mean" in gates and "value" in gates
    assert json.loads((tmp_path / "out" / "report.json").read_text())["best"] is None  # written before exit 3


def test_clear_cache_removes_only_artifacts(tmp_path: Path) -> None:
    root = tmp_path / "c"
    (root / "compare" / "w4-x").mkdir(parents=True)
    (root / "compare" / "w4-x" / "optcli.json").write_text(json.dumps({"optcli_version": "0", "recipe": {}, "source": {}}))
    (root / "compare" / "notes").mkdir()
    result = optcli(root, "compare", "--clear-cache", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["removed"] == [str(root / "compare" / "w4-x")]
    assert (root / "compare" / "notes").is_dir() and not (root / "compare" / "w4-x").exists()
