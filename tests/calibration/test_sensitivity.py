"""Per-layer sensitivity: the ranking matches what quantizing the ranked layers really costs, the other
rungs' estimates are close to measurement, and `calibrate --sensitivity` writes the table, the JSON and the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optcli.calibration.sensitivity import LADDER, W4A16, KldProbe, batches, clipped_rtn4, measure_sensitivity
from optcli.engine.quant.weights import Int4Weight

OPTCLI = str(Path(sys.executable).parent / "optcli")
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def story_windows(tokenizer, start: int, n: int, length: int = 64) -> list[list[int]]:
    text = (DATA / "tinystories_train_sample.txt").read_text(encoding="utf-8")[start : start + 40_000]
    ids = tokenizer(text, verbose=False).input_ids
    return [ids[i * length : (i + 1) * length] for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    from optcli.checkpoints.resolve import load_model, resolve_model

    return load_model(resolve_model("builtin:tiny-llama"))


def quantized_together(model, names: list[str]):
    """Context: `names` rounded to W4A16 at once, restored after."""
    import contextlib

    @contextlib.contextmanager
    def swap():
        modules = dict(model.named_modules())
        saved = {n: modules[n].weight.data.clone() for n in names}
        try:
            for n in names:
                modules[n].weight.data.copy_(W4A16.fake_quantize(saved[n]))
            yield
        finally:
            for n in names:
                modules[n].weight.data.copy_(saved[n])

    return swap()


def test_top_tenth_costs_more_than_bottom_half(tiny) -> None:
    """Ranked on calibration text, measured on other text: the top 10% of layers quantized together cost
    more KLD than the bottom 50% quantized together."""
    model, tokenizer = tiny
    report = measure_sensitivity(model, story_windows(tokenizer, 60_000, 4), max_tokens=256)
    names = [r["layer"] for r in report["layers"]]
    top, bottom = names[: max(1, len(names) // 10)], names[len(names) // 2 :]
    probe = KldProbe(model, batches(story_windows(tokenizer, 0, 4), 4))
    with quantized_together(model, top):
        top_kld = probe.kld()
    with quantized_together(model, bottom):
        bottom_kld = probe.kld()
    assert top_kld > bottom_kld > 0, (top_kld, bottom_kld)
    assert probe.kld() == pytest.approx(0.0, abs=1e-6)  # every weight was put back


def test_report_is_ranked_with_shares_and_every_layer(tiny) -> None:
    model, tokenizer = tiny
    before = {n: p.clone() for n, p in model.state_dict().items()}
    report = measure_sensitivity(model, story_windows(tokenizer, 60_000, 2), max_tokens=128)
    rows = report["layers"]
    assert len(rows) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 blocks; never the head
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(a["kld"] >= b["kld"] for a, b in zip(rows, rows[1:], strict=False))
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert report["tokens"] == 128 and report["joint_kld"] > 0
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the model is left as it was


def test_block_shortcut_scores_like_the_full_model(tiny) -> None:
    model, tokenizer = tiny
    probe = KldProbe(model, batches(story_windows(tokenizer, 60_000, 2), 2))
    assert probe.decoder is not None  # Llama: running from block i reproduces the source's logits
    layer = model.model.layers[2].mlp.down_proj
    saved = layer.weight.data.clone()
    try:
        layer.weight.data.copy_(W4A16.fake_quantize(saved))
        assert probe.kld(start=2) == pytest.approx(probe.kld(start=0), rel=1e-3)
    finally:
        layer.weight.data.copy_(saved)


def test_rung_estimates_are_close_to_measurement(stories_dir: Path) -> None:
    from optcli.checkpoints.resolve import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(str(stories_dir)))
    windows = story_windows(tokenizer, 60_000, 4)
    estimated = measure_sensitivity(model, windows, max_tokens=256)
    measured = {r["layer"]: r for r in measure_sensitivity(model, windows, max_tokens=256, measure_all=True)["layers"]}
    assert estimated["estimated"] == [r.name for r in LADDER[1:-1]]
    for row in estimated["layers"][:10]:  # the layers an allocation would upgrade first
        for rung in LADDER[1:-1]:
            ratio = row["kld_by_scheme"][rung.name] / measured[row["layer"]]["kld_by_scheme"][rung.name]
            assert 0.5 < ratio < 2.0, (row["layer"], rung.name, ratio)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipped_rounding_never_loses_to_min_max(symmetric: bool) -> None:
    """The "mse" observer's search includes the full range, so its error is never above min-max's; with no
    shrinking allowed it is min-max (the engine's own round-to-nearest)."""
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    weight[0, 0] = 12.0  # an outlier: clipping pays off in its group
    plain = Int4Weight.rtn(weight, 32, symmetric).dequantize()
    clipped = clipped_rtn4(weight, 32, symmetric)
    err = (clipped - weight).abs().pow(2.4).reshape(64, 8, 32).sum(-1)
    assert (err <= (plain - weight).abs().pow(2.4).reshape(64, 8, 32).sum(-1) + 1e-5).all()
    assert (clipped - weight).pow(2).sum() < (plain - weight).pow(2).sum()
    torch.testing.assert_close(clipped_rtn4(weight, 32, symmetric, max_shrink=0.0), plain, atol=1e-6, rtol=0)


def test_calibrate_sensitivity_writes_table_json_and_plot(tmp_path: Path, stories_dir: Path) -> None:
    out = tmp_path / "calib"
    args = ["calibrate", "--model", str(stories_dir), "--source", str(DATA / "tinystories_train_sample.txt"),
            "--out", str(out), "--samples", "4", "--seq-len", "64", "--sensitivity"]
    result = subprocess.run([OPTCLI, *args, "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["sensitivity"]
    report = json.loads((out / "sensitivity.json").read_text())
    assert summary["top"][0]["layer"] == report["layers"][0]["layer"]
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert report["source_weights"] and report["calibration_sha256"] == json.loads((out / "manifest.json").read_text())["sha256"]
    table = subprocess.run([OPTCLI, *args, "--force"], capture_output=True, text=True, timeout=600)
    assert table.returncode == 0, table.stderr
    assert "per-layer sensitivity" in table.stdout and report["layers"][0]["layer"] in table.stdout
