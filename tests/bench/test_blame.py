"""`profile --per-layer`: an artifact's KLD traced to its layers, on the real stories260K."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optcli.bench.blame import blame_baseline, per_layer_blame
from optcli.errors import UsageError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def rtn_artifact(stories_dir: Path, tmp_path_factory) -> Path:
    from optcli.quantize.pipeline import quantize

    out = tmp_path_factory.mktemp("blame") / "rtn"
    quantize(str(stories_dir), "w4a16-rtn", out, device="cpu")
    return out


def test_blame_ranks_the_changed_layers(rtn_artifact: Path, stories_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "eval.txt"
    text.write_text((DATA / "tinystories_train_sample.txt").read_text(encoding="utf-8")[:8000], encoding="utf-8")
    assert blame_baseline(str(rtn_artifact), None) == str(stories_dir)  # the source the manifest names
    blame = per_layer_blame(str(rtn_artifact), str(stories_dir), text, max_tokens=512)
    # w4a16-rtn leaves the five 172-wide down_proj layers in bf16: nothing to blame there
    assert blame["layers_changed"] == 30 and blame["layers_unchanged"] == 5
    assert not any("down_proj" in r["layer"] for r in blame["layers"])
    klds = [r["kld"] for r in blame["layers"]]
    assert klds == sorted(klds, reverse=True) and klds[-1] > 0
    assert sum(r["share"] for r in blame["layers"]) == pytest.approx(1.0)
    assert blame["joint_kld"] > klds[0]  # all changed layers together cost more than the worst one alone


def test_per_layer_needs_a_baseline(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--baseline"):
        blame_baseline(str(tmp_path), None)


def test_per_layer_json_beside_the_report(rtn_artifact: Path, stories_dir: Path, tmp_path: Path) -> None:
    from optcli.cli.profile_blame import BLAME_FILE, run_per_layer

    text = tmp_path / "eval.txt"
    text.write_text((DATA / "tinystories_train_sample.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    blame = run_per_layer(str(rtn_artifact), str(stories_dir), text, tmp_path, quiet=True)
    assert json.loads((tmp_path / BLAME_FILE).read_text())["layers"][0]["layer"] == blame["layers"][0]["layer"]
