"""`--recipe auto:BITS`: bad budgets refused before any work, the greedy allocation, and a mixed artifact
that our engine runs with each layer on its own kernel, agreeing with its dense twin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optcli.errors import UsageError
from optcli.quantize.mixed import allocate, parse_budget
from optcli.quantize.recipes import load_recipe

OPTCLI = str(Path(sys.executable).parent / "optcli")
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.parametrize("name", ["auto:abc", "auto:1", "auto:17", "auto:", "auto:nan", "auto:inf"])
def test_bad_budget_is_one_line_exit_2_before_any_work(tmp_path: Path, name: str) -> None:
    out = tmp_path / "art"
    result = subprocess.run([OPTCLI, "quantize", "builtin:tiny-llama", "--recipe", name, "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and name in lines[0] and "BITS" in lines[0], result.stderr
    assert not out.exists()


def test_auto_resolves_through_load_recipe() -> None:
    recipe = load_recipe("auto:4.5")
    assert recipe.budget_bits == 4.5 and recipe.name == "auto:4.5" and recipe.backend == "llmcompressor"
    assert parse_budget("w4a16-gptq") is None
    with pytest.raises(UsageError):
        load_recipe("auto:3")


def layer(name: str, kld4: float, params: int = 1024, width: int = 128) -> dict:
    return {"layer": name, "kld": kld4, "params": params, "in_features": width,
            "kld_by_scheme": {"W4A16": kld4, "W8A16": kld4 / 256, "BF16": 0.0}}


def fake_report() -> dict:
    rows = [layer(f"model.layers.0.self_attn.{p}", k) for p, k in (("q_proj", 0.05), ("k_proj", 0.04),
                                                                   ("v_proj", 0.03), ("o_proj", 0.001))]
    rows += [layer(f"model.layers.0.mlp.{p}", k, 4096) for p, k in (("gate_proj", 0.01), ("up_proj", 0.01),
                                                                    ("down_proj", 0.2))]
    return {"layers": rows}


def test_greedy_spends_bits_where_kld_per_bit_is_highest() -> None:
    report = fake_report()
    floor = allocate(report, 4.125)
    assert set(floor.choice.values()) == {"W4A16"} and floor.bits_per_weight == pytest.approx(4.125)
    mid = allocate(report, 6.0)
    # down_proj saves 0.2 for 4096 weights (4.9e-5 per weight), q/k/v 0.12 for 3072 (3.9e-5): down goes first
    assert mid.choice["model.layers.0.mlp.down_proj"] != "W4A16"
    assert mid.bits_per_weight <= 6.0
    # q/k/v run as one fused matmul in the engine: they always share a rung
    assert len({mid.choice[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"}) == 1
    assert mid.predicted_kld < floor.predicted_kld
    assert "upgrade" in mid.reasons["model.layers.0.mlp.down_proj"]
    top = allocate(report, 16.0)
    assert set(top.choice.values()) == {"BF16"} and top.predicted_kld == 0.0


def test_budget_below_the_floor_names_it() -> None:
    report = {"layers": [layer("model.layers.0.self_attn.q_proj", 0.1, width=64)]}  # per channel: 4.25 bits
    with pytest.raises(UsageError, match="floor of 4.250"):
        allocate(report, 4.1)


@pytest.fixture(scope="module")
def mixed_artifact(stories_dir: Path, tmp_path_factory) -> Path:
    from optcli.calibration.dataset import calibrate
    from optcli.quantize.pipeline import quantize

    work = tmp_path_factory.mktemp("mixed")
    calib = work / "calib"
    calibrate(str(stories_dir), str(DATA / "tinystories_train_sample.txt"), calib, 8, 64, sensitivity=True)
    quantize(str(stories_dir), "auto:5", work / "auto5", calibration=calib, device="cpu")
    return work / "auto5"


def test_mixed_artifact_records_choices_and_rerunnable_recipe(mixed_artifact: Path) -> None:
    manifest = json.loads((mixed_artifact / "optcli.json").read_text())
    alloc = manifest["allocation"]
    assert alloc["budget_bits"] == 5 and alloc["floor_bits"] <= alloc["bits_per_weight"] <= 5
    assert alloc["sensitivity"]["reused"]  # measured by calibrate --sensitivity on the same weights
    assert {"W4A16", "W8A16"} <= set(alloc["layers_per_scheme"])
    for name, entry in manifest["layers"].items():
        assert entry["precision"] in ("W4A16", "W8A16", "BF16") and entry["reason"].startswith(entry["precision"]), name
    recipe = load_recipe(str(mixed_artifact / "recipe.yaml"))  # the same allocation, rerunnable or editable
    groups = recipe.llmcompressor["quant_stage"]["quant_modifiers"]["GPTQModifier"]["config_groups"]
    chosen = {n for n, e in manifest["layers"].items() if e["precision"] == "W8A16"}
    assert set(groups["group_w8a16"]["targets"]) == chosen and recipe.budget_bits is None


def test_engine_runs_each_layer_on_its_own_kernel(mixed_artifact: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optcli.engine import Engine
    from optcli.engine.loading.state_dict import load_dense_state_dict
    from optcli.engine.quant.layers import quant_summary

    twin = tmp_path / "twin"
    twin.mkdir()
    config = json.loads((mixed_artifact / "config.json").read_text())
    config.pop("quantization_config")
    save_file({k: v.contiguous() for k, v in load_dense_state_dict(mixed_artifact).items()}, twin / "model.safetensors")
    (twin / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    engine = Engine(str(mixed_artifact), device="cpu", max_model_len=256)
    kinds = {key.split("/")[0] for key in quant_summary(engine.model)}
    assert {"int4", "int8"} <= kinds, kinds  # W4A16 layers on int4 kernels, W8A16 layers on int8 ones
    text = (DATA / "tinystories_train_sample.txt").read_text(encoding="utf-8")[:6000]
    ids = AutoTokenizer.from_pretrained(mixed_artifact)(text, verbose=False).input_ids
    agree = total = 0
    for start in range(0, 4 * 128, 128):
        window = ids[start : start + 128]
        with torch.no_grad():
            theirs = hf(torch.tensor([window])).logits[0]
        agree += int((engine.score(window).argmax(-1) == theirs.argmax(-1)).sum())
        total += len(window)
    assert agree / total >= 0.95, agree / total
