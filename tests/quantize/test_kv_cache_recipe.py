"""The shipped `fp8-dynamic-kv` recipe: llm-compressor calibrates per-layer FP8 KV scales into the artifact
(compressed-tensors `kv_cache_scheme`, `self_attn.k_scale` / `v_scale`), and our engine serves the artifact
with exactly those scales in an FP8 cache (read back here from the artifact's own tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from optcli.calibration.corpus import heldout_text
from optcli.calibration.dataset import build_from_source, save_calibration_set
from optcli.engine import Engine, SamplingParams
from optcli.quantize.pipeline import apply_recipe, save_artifact
from optcli.quantize.recipes import load_recipe


def test_recipe_ships_with_a_calibrated_fp8_kv_cache_scheme() -> None:
    recipe = load_recipe("fp8-dynamic-kv")
    scheme = recipe.llmcompressor["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["kv_cache_scheme"]
    assert scheme["type"] == "float" and scheme["num_bits"] == 8 and scheme["dynamic"] is False
    assert recipe.needs_calibration() and "lm_head" in recipe.ignore


def test_artifact_runs_in_the_engine_with_its_calibrated_scales(stories_dir, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(stories_dir)
    source = tmp_path / "calib.txt"
    source.write_text(heldout_text()[:20000], encoding="utf-8")
    calib = save_calibration_set(build_from_source(tok, str(source), 16, 128), tmp_path / "calib")
    qm = apply_recipe(str(stories_dir), "fp8-dynamic-kv", calibration=calib, device="cpu")
    art = Path(save_artifact(qm, tmp_path / "art")["artifact"])
    config = json.loads((art / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"]["type"] == "float"
    saved = {}
    for f in art.glob("*.safetensors"):
        with safe_open(f, framework="pt") as handle:
            saved.update({n: handle.get_tensor(n) for n in handle.keys() if n.endswith(("k_scale", "v_scale"))})
    engine = Engine(str(art), device="cpu")  # kv_cache_dtype auto: the artifact's scheme decides
    cache = engine.stats()["kv_cache"]
    assert cache["dtype"] == "fp8_e4m3" and cache["scale_source"] == "calibrated"
    assert len(saved) == 2 * len(engine.kv.scales)
    for layer, scales in enumerate(engine.kv.scales):
        for name, got in (("k_scale", scales.k), ("v_scale", scales.v)):
            want = saved[f"model.layers.{layer}.self_attn.{name}"].float().reshape(-1)
            assert bool((want > 0).all())
            torch.testing.assert_close(got, want.expand(got.shape[0])[:, None].expand_as(got).contiguous())
    out = engine.generate([tok("Once upon a time").input_ids], SamplingParams(max_tokens=8))[0]
    assert len(out.token_ids) == 8
