"""The dtype a recipe is calibrated in (quantize/pipeline.py `calibration_dtype`): the recipe's own where the CPU
does bf16 in hardware, fp32 where torch would emulate it, and in both cases an artifact in the recipe's dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import optcli.engine.kernels.cpu_caps as cpu_caps
from optcli.quantize.pipeline import apply_recipe, calibration_dtype, save_artifact
from optcli.quantize.recipes import load_recipe

AVX2 = frozenset({"avx2", "fma", "f16c"})
AMX = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}


@pytest.mark.parametrize(("flags", "recipe", "device", "expected"), [
    (AVX2, "w4a16-gptq", "cpu", "float32"),  # emulated bf16: calibrate in fp32
    (AVX2, "w4a16-awq", "cpu", "float32"),
    (AMX, "w4a16-gptq", "cpu", "bfloat16"),  # native bf16: the recipe's dtype
    (AVX2, "w4a16-gptq", "cuda", "bfloat16"),  # a GPU has bf16
    (AVX2, "w4a16-rtn", "cpu", "bfloat16"),  # no calibration forward to speed up
    (AVX2, "bf16", "cpu", "bfloat16"),
])
def test_the_calibration_dtype_follows_the_cpus_flags(monkeypatch, flags, recipe, device, expected) -> None:
    monkeypatch.setattr(cpu_caps, "cpu_flags", lambda: flags)
    dtype, reason = calibration_dtype(load_recipe(recipe), device)
    assert dtype == expected
    assert ("no native bf16" in reason) == (expected == "float32")


def test_calibrated_in_fp32_saved_in_the_recipes_dtype(monkeypatch, tmp_path: Path) -> None:
    """GPTQ run in fp32 on a CPU without native bf16; the artifact holds bf16 tensors (as a bf16 run's would), says
    so in its config, records the work dtype in optcli.json, and reloads with the logits it had in memory."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(cpu_caps, "cpu_flags", lambda: AVX2)
    qm = apply_recipe("builtin:tiny-llama", "w4a16-gptq", device="cpu")
    manifest = save_artifact(qm, tmp_path / "art")
    assert manifest["work_dtype"]["dtype"] == "float32"
    assert json.loads((tmp_path / "art" / "optcli.json").read_text())["work_dtype"]["dtype"] == "float32"
    assert json.loads((tmp_path / "art" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "art" / "model.safetensors"), "pt") as f:
        floats = {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}
    assert floats == {torch.bfloat16}
    probe = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "art", device_map="cpu").eval()
    with torch.no_grad():
        diff = (reloaded(probe).logits.float() - qm.model(probe).logits.float()).abs()
    assert diff.max().item() <= 0.02 * qm.model(probe).logits.float().abs().max().item()
