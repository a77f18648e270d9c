"""`profile --export`: one row per online request, for the artifact and for its baseline, as JSONL or CSV
(a wrong suffix is exit 2 before anything runs); and the shared-prefix workload's prefix-cache hit rate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optcli.bench.export import check_export_path, write_export
from optcli.cli import app
from optcli.errors import UsageError

LOAD = ["--requests", "5", "--prompt-len", "8:12", "--output-len", "3", "--concurrency", "2", "--json"]


def test_every_online_request_is_one_row(stories_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    rows_path = tmp_path / "requests.jsonl"
    result = runner.invoke(app, ["profile", str(stories_dir), "--baseline", str(stories_dir), *LOAD,
                                 "--export", str(rows_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert report["workload"]["export"] == {"path": str(rows_path), "rows": 10}
    assert [r["phase"] for r in rows] == ["candidate"] * 5 + ["baseline"] * 5
    assert all(r["error"] is None and r["output_tokens"] == 3 and 8 <= r["prompt_tokens"] < 12 for r in rows)
    assert all(0 < r["ttft_ms"] <= r["e2e_ms"] and r["tpot_ms"] > 0 for r in rows)
    assert min(r["start_s"] for r in rows[:5]) == 0.0
    csv_path = tmp_path / "requests.csv"
    result = runner.invoke(app, ["profile", str(stories_dir), *LOAD, "--export", str(csv_path)])
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(csv_path.open()))
    assert len(table) == 5 and float(table[0]["e2e_ms"]) > 0 and table[0]["error"] == ""


def test_a_wrong_export_suffix_is_exit_2(stories_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["profile", str(stories_dir), "--export", str(tmp_path / "x.txt")])
    assert result.exit_code == 2 and ".jsonl or .csv" in result.output


def test_a_shared_prefix_workload_hits_the_prefix_cache(stories_dir: Path) -> None:
    """--prefix-len / --prefix-count: each prompt opens with one of K shared system prompts; the report's
    online prefix-cache hit rate is above 0 with them and 0 without (random prompts share no block)."""
    runner = CliRunner()
    rates = {}
    for extra in ([], ["--prefix-len", "48", "--prefix-count", "2"]):
        result = runner.invoke(app, ["profile", str(stories_dir), *LOAD, *extra])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        rates[bool(extra)] = report["throughput"]["prefix_cache_hit_rate"]
    assert rates[False] == 0.0 and rates[True] > 0.3
    assert report["workload"]["prefix"] == {"len": 48, "count": 2}


def test_an_export_replaces_only_an_earlier_export(tmp_path: Path) -> None:
    """Re-running with the same --export replaces the file; any other file (the dataset, say) is kept."""
    row = {"model": "m", "phase": "candidate", "level": "c1", "measured": True, "index": 0, "start_s": 0.0,
           "ttft_ms": 1.0, "tpot_ms": 1.0, "itl_ms_mean": 1.0, "e2e_ms": 3.0, "prompt_tokens": 8, "output_tokens": 3,
           "error": None}
    for name in ("requests.jsonl", "requests.csv"):
        earlier = tmp_path / name
        write_export(earlier, [row])
        check_export_path(earlier)  # ours: may be replaced
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "Once upon a time", "output_tokens": 3}\n')
    with pytest.raises(UsageError, match="prompts.jsonl: exists and is not an earlier export: kept"):
        check_export_path(dataset)
    assert dataset.read_text() == '{"prompt": "Once upon a time", "output_tokens": 3}\n'
