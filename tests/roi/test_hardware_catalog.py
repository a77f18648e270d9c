"""GPU catalog: packaged datasheet figures, user overrides, detection and recipe advice by hardware."""

from __future__ import annotations

import tomllib
import types
from pathlib import Path

import pytest

from optcli.errors import UsageError
from optcli.roi import hardware

ROOT = Path(__file__).resolve().parents[2]


def test_packaged_catalog_has_the_issue_gpus_with_dense_datasheet_figures() -> None:
    cat = hardware.load_catalog()
    assert {"A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "L4", "L40S", "RTX-4090"} <= set(cat)
    h100 = cat["H100-80GB"]
    assert (h100.memory_gb, h100.bandwidth_gbs, h100.bf16_tflops, h100.fp8_tflops, h100.int8_tops) == (
        80, 3350, 989, 1979, 1979)
    assert cat["A100-80GB"].fp8_tflops is None and cat["A100-80GB"].capability == (8, 0)
    assert cat["H200-141GB"].bandwidth_gbs == 4800 and cat["L4"].capability == (8, 9)
    assert all(g.hourly_usd > 0 and g.source for g in cat.values())


def test_catalog_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "roi/gpu_catalog.yaml" in config["tool"]["setuptools"]["package-data"]["optcli"]
    assert hardware.CATALOG_FILE.is_file() and hardware.CATALOG_FILE.parent.name == "roi"


def test_user_catalog_merges_over_the_packaged_one(tmp_path: Path, monkeypatch) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("h100-80gb:\n  hourly_usd: 2.25\nB200:\n  memory_gb: 180\n  bandwidth_gbs: 8000\n"
                    "  bf16_tflops: 2250\n  fp8_tflops: 4500\n  int8_tops: 4500\n  compute_capability: '10.0'\n"
                    "  hourly_usd: 6.0\n  match: [B200]\n")
    cat = hardware.load_catalog(mine)
    assert cat["H100-80GB"].hourly_usd == 2.25 and cat["H100-80GB"].bf16_tflops == 989  # other fields kept
    assert hardware.lookup_gpu("b200", cat).capability == (10, 0)
    monkeypatch.setenv(hardware.CATALOG_ENV, str(mine))
    assert hardware.load_catalog()["H100-80GB"].hourly_usd == 2.25
    monkeypatch.delenv(hardware.CATALOG_ENV)
    mine.write_text("L4:\n  hourly_usd: -1\n")
    with pytest.raises(UsageError, match="hourly_usd"):
        hardware.load_catalog(mine)
    mine.write_text("L4:\n  price: 1\n")
    with pytest.raises(UsageError, match="unknown field 'price'"):
        hardware.load_catalog(mine)
    with pytest.raises(UsageError, match="cannot read"):
        hardware.load_catalog(tmp_path / "missing.yaml")


def test_unknown_gpu_lists_the_known_ones() -> None:
    with pytest.raises(UsageError) as info:
        hardware.lookup_gpu("V100", hardware.load_catalog())
    assert "unknown GPU 'V100'" in str(info.value) and "A100-40GB" in str(info.value) and "L4" in str(info.value)


@pytest.mark.parametrize(("device", "gib", "expected"), [
    ("NVIDIA A100-SXM4-40GB", 40, "A100-40GB"), ("NVIDIA A100 80GB PCIe", 80, "A100-80GB"),
    ("NVIDIA H100 80GB HBM3", 79.6, "H100-80GB"), ("NVIDIA H200", 140.4, "H200-141GB"),
    ("NVIDIA L4", 22.5, "L4"), ("NVIDIA L40S", 45, "L40S"), ("NVIDIA GeForce RTX 4090", 24, "RTX-4090"),
    ("Tesla T4", 15, None),
])
def test_device_names_match_the_catalog(device: str, gib: float, expected: str | None) -> None:
    spec = hardware.match_catalog(device, int(gib * 2**30), hardware.load_catalog())
    assert (spec.name if spec else None) == expected


def test_detect_gpu(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.detect_gpu() is None
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=81559 * 2**20)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    assert hardware.detect_gpu() == {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 81559 * 2**20,
                                     "compute_capability": "9.0", "catalog": "H100-80GB"}


@pytest.mark.parametrize(("cc", "fp8", "batch", "first", "also"), [
    ("9.0", True, 64, "fp8-dynamic", "w4a16-gptq"),  # Hopper, throughput: FP8
    ("8.9", True, None, "fp8-dynamic", "w4a16-gptq"),  # Ada has FP8 too
    ("9.0", True, 1, "w4a16-gptq", "fp8-dynamic"),  # memory-bound small batch: 4-bit weights first
    ("8.0", False, 64, "w8a8-int8", "w4a16-gptq"),  # Ampere, throughput: INT8 W8A8
    ("8.6", False, 2, "w4a16-gptq", "w8a8-int8"),
    ("7.5", False, 64, "w4a16-gptq", None),  # Turing: neither FP8 nor fast INT8 W8A8 path here
    (None, True, 1, "w4a16-gptq", None),  # CPU
])
def test_recipe_advice_by_hardware(cc, fp8, batch, first, also) -> None:
    recs = hardware.recommend_recipes(cc, fp8, batch)
    assert recs[0]["recipe"] == first and all(r["reason"] for r in recs)
    assert [r["recipe"] for r in recs[1:2]] == ([also] if also else [])
    if first == "fp8-dynamic":
        assert "FP8" in recs[0]["reason"]


@pytest.mark.parametrize(("typed", "expected"), [
    ("h100", "H100-80GB"), ("H100", "H100-80GB"), ("h200", "H200-141GB"), ("H100-80GB", "H100-80GB"),
    ("h100_80gb", "H100-80GB"), ("rtx_4090", "RTX-4090"), ("rtx 4090", "RTX-4090"), ("RTX4090", "RTX-4090"),
    ("l4", "L4"), ("L4", "L4"), ("l40s", "L40S"), ("a100_40gb", "A100-40GB"),
])
def test_gpu_names_as_people_type_them(typed: str, expected: str) -> None:
    """Case, '-', '_' and spaces alike; the seed article's keys; a unique prefix; an exact name (l4)
    wins over the names it is a prefix of (l40s)."""
    assert hardware.lookup_gpu(typed, hardware.load_catalog()).name == expected


def test_only_abbreviations_say_how_they_were_resolved() -> None:
    cat = hardware.load_catalog()
    assert hardware.resolve_gpu("rtx_4090", cat).note is None
    assert hardware.resolve_gpu("h100", cat).note == "h100 → H100-80GB (unique prefix)"


def test_a_prefix_ends_at_a_separator() -> None:
    """`l40` and `a10` are other GPUs, not abbreviations of L40S and A100-*."""
    for name in ("l40", "a10"):
        with pytest.raises(UsageError, match=f"unknown GPU '{name}'"):
            hardware.lookup_gpu(name, hardware.load_catalog())


def test_ambiguous_name_picks_the_catalog_default_and_says_so(tmp_path: Path) -> None:
    choice = hardware.resolve_gpu("a100", hardware.load_catalog())
    assert choice.spec.name == "A100-80GB" and choice.candidates == ("A100-40GB", "A100-80GB")
    assert choice.note == "a100 → A100-80GB (catalog default of A100-40GB, A100-80GB)"
    mine = tmp_path / "mine.yaml"
    mine.write_text("A100-80GB:\n  default: false\nA100-40GB:\n  default: true\n")
    assert hardware.lookup_gpu("A100", hardware.load_catalog(mine)).name == "A100-40GB"


def test_ambiguous_name_without_a_default_lists_the_candidates(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("a100_80gb:\n  default: false\n")  # merged over A100-80GB: names match as --gpu does
    cat = hardware.load_catalog(mine)
    assert "a100_80gb" not in cat and cat["A100-80GB"].default is False
    with pytest.raises(UsageError) as info:
        hardware.lookup_gpu("a100", cat)
    assert "ambiguous GPU 'a100'" in str(info.value) and "A100-40GB, A100-80GB" in str(info.value)
    mine.write_text("A100-40GB:\n  default: yes please\n")
    with pytest.raises(UsageError, match="'default' must be true or false"):
        hardware.load_catalog(mine)
