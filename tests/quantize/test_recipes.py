"""Recipes: every shipped one validates; mistakes name the file, the field and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from optcli.errors import UsageError
from optcli.quantize.recipes import builtin_names, load_recipe

SHIPPED = {"bf16", "w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w8a8-int8", "fp8-dynamic", "nf4-bnb", "int8-bnb", "2of4-w4a16"}


def test_all_design_recipes_ship_and_validate() -> None:
    assert SHIPPED <= set(builtin_names())
    for name in SHIPPED:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.backend in ("none", "llmcompressor", "bnb")
        assert "lm_head" in recipe.ignore or recipe.backend == "none"


def test_calibration_needs_follow_the_algorithm() -> None:
    assert load_recipe("w4a16-gptq").needs_calibration()
    assert load_recipe("w4a16-awq").needs_calibration()
    assert not load_recipe("w4a16-rtn").needs_calibration()
    assert not load_recipe("nf4-bnb").needs_calibration()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return path


def test_user_yaml_path_works_like_a_name(tmp_path: Path) -> None:
    text = Path(load_recipe("w4a16-rtn").source).read_text().replace("name: w4a16-rtn", "name: mine")
    assert load_recipe(str(_write(tmp_path, text))).name == "mine"


def test_unknown_field_names_file_field_and_allowed(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\ndescription: d\nbackend: none\nscheme: BF16\nigonre: [lm_head]\n")
    with pytest.raises(UsageError) as info:
        load_recipe(str(path))
    msg = str(info.value)
    assert str(path) in msg and "igonre" in msg and "ignore" in msg and "backend" in msg


def test_bad_value_lists_allowed_values(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\ndescription: d\nbackend: gptq\nscheme: W4A16\n")
    with pytest.raises(UsageError) as info:
        load_recipe(str(path))
    msg = str(info.value)
    assert "backend" in msg and "'llmcompressor'" in msg and "'bnb'" in msg


def test_nested_typo_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\ndescription: d\nbackend: bnb\nscheme: NF4\nbnb:\n  quant_typ: nf4\n")
    with pytest.raises(UsageError, match=r"bnb\.quant_typ.*allowed: quant_type"):
        load_recipe(str(path))


def test_unknown_recipe_lists_builtins() -> None:
    with pytest.raises(UsageError, match="w4a16-gptq"):
        load_recipe("w4a16-gtpq")


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_backend_block_required(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\ndescription: d\nbackend: llmcompressor\nscheme: W4A16\n")
    with pytest.raises(UsageError, match="llmcompressor"):
        load_recipe(str(path))
