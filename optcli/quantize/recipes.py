"""Recipe schema and loading.

A recipe is a YAML file: our own small header (backend, scheme, ignore list, calibration needs,
tunables) plus, for the llm-compressor backend, a block in llm-compressor's own recipe format so a
user can paste theirs unchanged. The header is validated here with pydantic; the llm-compressor
block is validated by llm-compressor itself when a quantize run builds its modifiers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optcli.builtin import recipes_dir
from optcli.errors import UsageError

RECIPES_DIR = recipes_dir()


class Calibration(BaseModel):
    """How much calibration data the recipe needs (samples of seq_len tokens)."""

    model_config = ConfigDict(extra="forbid")
    required: bool = True
    samples: int = Field(128, ge=1, le=100_000)
    seq_len: int = Field(512, ge=8, le=1_000_000)


class BnbOptions(BaseModel):
    """bitsandbytes settings, mapped onto transformers' BitsAndBytesConfig."""

    model_config = ConfigDict(extra="forbid")
    quant_type: Literal["nf4", "fp4", "int8"]
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    int8_threshold: float = 6.0


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str
    backend: Literal["none", "llmcompressor", "bnb"]
    scheme: str = Field(description="short label, e.g. W4A16 or NF4")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    # A layer whose input width is not a multiple of the group size (and wider than one group):
    # quantize it per output channel, or leave it in `dtype`. The choice is recorded per layer.
    indivisible: Literal["channel", "skip"] = "skip"
    calibration: Calibration = Field(default_factory=Calibration)
    # Values applied to every llm-compressor modifier that has a field of that name.
    tunables: dict[str, Any] = Field(default_factory=dict)
    llmcompressor: dict[str, Any] | None = None
    bnb: BnbOptions | None = None
    # `auto:BITS`: the average bits per weight to spend on the ladder W4A16 ... bf16 (quantize/mixed.py);
    # the allocation then replaces the llm-compressor block, per model.
    budget_bits: float | None = Field(None, ge=4, le=16)
    notes: str = ""
    source: str = ""  # where the recipe was read from (filled in on load)

    def needs_calibration(self) -> bool:
        return self.backend == "llmcompressor" and self.calibration.required


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for listing its allowed fields)."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        candidates = (field.annotation, *get_args(field.annotation)) if field else ()
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _format_error(path: Path, err: ValidationError) -> str:
    # A typo shows up both as an unknown field and as a missing one: report the typo.
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        owner = _model_at(first["loc"][:-1])
        allowed = f" (allowed: {', '.join(f for f in owner.model_fields if f != 'source')})" if owner else ""
        return f"{path}: unknown field '{field}'{allowed}"
    return f"{path}: field '{field}': {first['msg']}"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UsageError(f"recipe file not found: {path}")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise UsageError(
        f"unknown recipe '{name_or_path}' (built-in recipes: {', '.join(builtin_names())}; "
        "or pass a path to a .yaml file, or auto:BITS for mixed precision)"
    )


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, a YAML file, or `auto:BITS` (a mixed-precision budget, quantize/mixed.py)."""
    if name_or_path.startswith("auto:"):
        from optcli.quantize.mixed import auto_recipe

        return auto_recipe(name_or_path)
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe must be a YAML mapping")
    try:
        recipe = Recipe.model_validate({**data, "source": str(path)})
    except ValidationError as exc:
        raise UsageError(_format_error(path, exc)) from None
    if recipe.backend == "llmcompressor" and not recipe.llmcompressor:
        raise UsageError(f"{path}: field 'llmcompressor': required when backend is llmcompressor")
    gptq = ((recipe.llmcompressor or {}).get("quant_stage") or {}).get("quant_modifiers") or {}
    if recipe.budget_bits is not None and "GPTQModifier" not in gptq:
        raise UsageError(f"{path}: field 'budget_bits': needs a GPTQModifier under llmcompressor.quant_stage.quant_modifiers")
    if recipe.backend == "bnb" and recipe.bnb is None:
        raise UsageError(f"{path}: field 'bnb': required when backend is bnb")
    return recipe


def list_recipes() -> list[Recipe]:
    return [load_recipe(name) for name in builtin_names()]
