"""Accuracy of an endpoint from its echoed top-k log-probs: `optcli serve`'s app on stories260K (and on its
W4A16 artifact) against the same model run locally, through `optcli profile --endpoint --baseline`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from helpers import serve_in_thread, shared_data
from typer.testing import CliRunner

from optcli.bench.endpoint_accuracy import topk_kld
from optcli.bench.targets.builtin import measure_accuracy
from optcli.cli import app
from optcli.config import EngineConfig
from optcli.engine.async_engine import AsyncEngine
from optcli.engine.engine import Engine
from optcli.serve.app import create_app

LOAD = ["--requests", "2", "--prompt-len", "8:12", "--output-len", "2", "--concurrency", "1"]


@contextlib.contextmanager
def served(path: Path, name: str):
    aengine = AsyncEngine(Engine(str(path), device="cpu"))
    try:
        with serve_in_thread(create_app(aengine, name)) as url:
            yield url
    finally:
        aengine.shutdown(10)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(shared_data("tinystories_train_sample.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


def profile(*args: str) -> dict:
    result = CliRunner().invoke(app, ["profile", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_same_model_served_and_local_agree_exactly(stories_dir: Path, text: Path) -> None:
    with served(stories_dir, "stories") as url:
        report = profile("stories", "--endpoint", url, "--baseline", str(stories_dir), "--tokenizer",
                         str(stories_dir), "--eval-text", str(text), *LOAD)
    acc = report["accuracy"]
    assert acc["top_k"] == 20 and report["workload"]["accuracy_backend"] == "endpoint top-20 log-probs"
    assert acc["kld_mean"] < 1e-4 and acc["top1_agreement"] == 1.0
    assert acc["ppl"] == pytest.approx(acc["baseline_ppl"], rel=1e-4) and acc["ppl"] > 1


def test_two_endpoints_compare_through_baseline_endpoint(stories_dir: Path, text: Path) -> None:
    """--baseline-endpoint: both sides from servers (here two servers of the same model): KLD 0, top-1 1."""
    with served(stories_dir, "stories") as url, served(stories_dir, "stories") as base_url:
        report = profile("stories", "--endpoint", url, "--baseline-endpoint", base_url, "--tokenizer",
                         str(stories_dir), "--eval-text", str(text), *LOAD)
    acc = report["accuracy"]
    assert report["baseline"] == base_url and acc["top_k"] == 20
    assert acc["kld_mean"] < 1e-6 and acc["top1_agreement"] == 1.0 and acc["ppl"] == pytest.approx(acc["baseline_ppl"])


def test_a_served_w4a16_artifact_has_the_local_kld_within_10_percent(stories_dir: Path, text: Path,
                                                                      tmp_path: Path) -> None:
    from optcli.quantize.pipeline import quantize

    artifact = tmp_path / "w4"
    quantize(str(stories_dir), "w4a16-rtn", artifact, device="cpu")
    local = measure_accuracy(artifact, stories_dir, text.read_text(encoding="utf-8"), EngineConfig(device="cpu"))
    with served(artifact, "w4") as url:
        report = profile("w4", "--endpoint", url, "--baseline", str(stories_dir), "--tokenizer", str(stories_dir),
                         "--eval-text", str(text), *LOAD)
    acc = report["accuracy"]
    assert acc["kld_mean"] == pytest.approx(local["kld_mean"], rel=0.1)
    assert acc["ppl"] == pytest.approx(local["ppl"], rel=1e-3)
    assert abs(acc["top1_agreement"] - local["top1_agreement"]) < 0.02


def test_topk_kld_is_zero_for_equal_views_and_counts_the_missing_mass() -> None:
    view = {"a": -0.1, "b": -2.5, "c": -4.0}
    assert topk_kld(view, dict(view)) == pytest.approx(0.0, abs=1e-12)
    shifted = {"a": -2.5, "b": -0.1, "d": -4.0}  # b's top tokens swapped, c missing: floor at the k-th
    assert topk_kld(view, shifted) > 1.0


def test_baseline_endpoint_needs_an_endpoint() -> None:
    result = CliRunner().invoke(app, ["profile", "builtin:tiny-llama", "--baseline-endpoint", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "--endpoint" in result.output
