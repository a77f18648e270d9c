"""`--recipe auto:BITS`: bad budgets refused before any work, the greedy allocation, and a mixed artifact
that our engine runs with each layer on its own kernel, agreeing with its dense twin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optcli.calibration.sensitivity import LADDER, RUNGS, W4A16, W4A16_G32_ZP, W4A16_G64_ZP, W4A16_ZP, W8A16
from optcli.errors import UsageError
from optcli.quantize.mixed import allocate, auto_recipe, concrete_recipe, parse_budget, weight_args
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


# each rung's KLD as a fraction of W4A16's: roughly stories260K's (zero point 0.8, g64 0.7, g32 0.55)
FRACTION = {"W4A16": 1.0, "W4A16-ZP": 0.8, "W4A16-G64-ZP": 0.7, "W4A16-G32-ZP": 0.55, "W8A16": 1 / 256, "BF16": 0.0}


def layer(name: str, kld4: float, params: int = 1024, width: int = 128) -> dict:
    return {"layer": name, "kld": kld4, "params": params, "in_features": width,
            "kld_by_scheme": {rung: kld4 * f for rung, f in FRACTION.items()}}


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


def test_flat_sensitivity_spends_the_bits_on_finer_4bit_rungs() -> None:
    """Every layer alike (stories260K is close to this): half a bit more per weight goes to zero points and
    finer groups for all, not to 8 bits for an eighth of the layers."""
    rows = [layer(f"model.layers.{i}.self_attn.o_proj", 0.01, width=256) for i in range(8)]
    alloc = allocate({"layers": rows}, 4.5)
    assert set(alloc.choice.values()) <= {W4A16_G64_ZP.name, W4A16_G32_ZP.name, W4A16_ZP.name}, alloc.choice
    assert alloc.bits_per_weight <= 4.5 and alloc.predicted_kld < 0.7 * 8 * 0.01


def test_concentrated_sensitivity_spends_the_bits_on_8_bits_for_one_layer() -> None:
    """One layer holds nearly all the KLD: it climbs past the 4-bit rungs to W8A16; the rest stay at 4 bits
    (what is left over buys them zero points)."""
    rows = [layer("model.layers.0.self_attn.o_proj", 1.0)] + [layer(f"model.layers.{i}.self_attn.o_proj", 1e-6)
                                                               for i in range(1, 8)]
    alloc = allocate({"layers": rows}, 4.7)
    assert alloc.choice["model.layers.0.self_attn.o_proj"] == W8A16.name
    assert {RUNGS[alloc.choice[r["layer"]]].bits for r in rows[1:]} == {4}


def test_rungs_count_scales_and_zero_points_and_fit_ragged_widths() -> None:
    assert W4A16.bits_per_weight(4096) == 4.125 and W4A16_G32_ZP.bits_per_weight(4096) == 4 + 20 / 32
    assert W4A16.bits_per_weight(64) == 4.25  # narrower than a group: one scale per row
    # as stored: 172 nibbles a row take 22 int32 words; zero points go 8 to a word down the rows
    assert W4A16.stored_bits(64, 172) == 64 * 22 * 32 + 64 * 16
    assert W4A16_G32_ZP.stored_bits(172, 64) == 172 * 8 * 32 + 22 * 32 * 2 + 172 * 2 * 16
    assert W4A16_G32_ZP.stored_bits(4096, 4096) == 4096 * 4096 * W4A16_G32_ZP.bits_per_weight(4096)
    # stories260K's 172-wide down_proj: the next divisor of the width above the group, else per row
    assert [r.group_for(172) for r in (W4A16, W4A16_G64_ZP, W4A16_G32_ZP)] == [172, 86, 43]
    bits = [r.bits_per_weight(w) for w in (64, 172, 768) for r in LADDER]
    for w in (64, 172, 768):  # cheapest first, whatever the width
        costs = [r.bits_per_weight(w) for r in LADDER]
        assert costs == sorted(costs), (w, costs)
    assert len(bits) == 3 * len(LADDER)
    assert weight_args(W4A16_G32_ZP, 172) == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                              "group_size": 43, "observer": "mse"}
    assert weight_args(W4A16, 64)["strategy"] == "channel" and "observer" not in weight_args(W4A16, 64)


def test_concrete_recipe_has_a_config_group_per_rung_and_group_size() -> None:
    rows = [layer("model.layers.0.mlp.down_proj", 0.2, width=172), layer("model.layers.0.self_attn.o_proj", 0.2),
            layer("model.layers.0.mlp.up_proj", 1e-9)]
    alloc = allocate({"layers": rows}, 4.6)
    recipe = concrete_recipe(auto_recipe("auto:4.6"), alloc, {r["layer"]: r["in_features"] for r in rows})
    groups = recipe.llmcompressor["quant_stage"]["quant_modifiers"]["GPTQModifier"]["config_groups"]
    targets = {name: key for key, g in groups.items() for name in g["targets"]}
    assert set(targets) == {r["layer"] for r in rows}  # every layer in exactly one group
    for key, g in groups.items():
        for name in g["targets"]:
            width = next(r["in_features"] for r in rows if r["layer"] == name)
            assert g["weights"] == weight_args(RUNGS[alloc.choice[name]], width), key


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
    assert "W8A16" in alloc["layers_per_scheme"] and len(alloc["layers_per_scheme"]) >= 2
    for name, entry in manifest["layers"].items():
        assert entry["precision"] in RUNGS and entry["reason"].startswith(entry["precision"]), name
    from safetensors import safe_open

    with safe_open(mixed_artifact / "model.safetensors", "pt") as f:  # the bits counted are the bytes stored
        stored = sum(f.get_tensor(k).nbytes for k in f.keys()
                     if k.rsplit(".", 1)[0] in manifest["layers"] and not k.endswith("weight_shape"))
    assert 8 * stored == pytest.approx(alloc["bits_per_weight"] * alloc["quantizable_params"], rel=1e-4)
    recipe = load_recipe(str(mixed_artifact / "recipe.yaml"))  # the same allocation, rerunnable or editable
    groups = recipe.llmcompressor["quant_stage"]["quant_modifiers"]["GPTQModifier"]["config_groups"]
    chosen = {n for n, e in manifest["layers"].items() if e["precision"] == "W8A16"}
    assert set(groups["group_w8a16"]["targets"]) == chosen and recipe.budget_bits is None


def test_engine_runs_each_layer_on_its_own_kernel(mixed_artifact: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optcli.engine import Engine
    from optcli.engine.loading.state_dict import save_dense_twin
    from optcli.engine.quant.layers import quant_summary

    twin = save_dense_twin(mixed_artifact, tmp_path / "twin")
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
