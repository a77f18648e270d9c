"""The quantize pipeline: load a model, apply a recipe, write an artifact with an `optcli.json` manifest.

One backend per file (llmcompressor.py, bnb.py); this module only orchestrates: resolve inputs
(all bad input is reported before any work starts), pick a device, calibrate, run the backend,
save atomically, and record what was done. Recipes (the YAML schema and the shipped ones) are in
recipes.py.

quantize may import calibration, checkpoints, builtin, config, errors and util; never cli, bench,
serve or roi (the engine runs what quantize writes; quantize does not need the engine).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optcli import __version__
from optcli.calibration.dataset import default_calibration_set, load_calibration_set
from optcli.checkpoints.resolve import load_model, resolve_model, weight_hashes
from optcli.errors import UsageError
from optcli.quantize.artifact import atomic_directory, directory_weight_bytes
from optcli.quantize.recipes import load_recipe
from optcli.util.env import library_versions, peak_memory_bytes, pick_device

MANIFEST = "optcli.json"


@dataclass
class QuantizedModel:
    """A model with a recipe applied, in memory, with everything the manifest records."""

    model: Any
    tokenizer: Any
    recipe: Any
    source: Any
    calibration: Any
    device: str
    layers: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)


def apply_recipe(
    model_spec: str,
    recipe_name: str,
    calibration: str | Path | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> QuantizedModel:
    """Load `model_spec` and quantize it in memory. `progress(done, total)` ticks per decoder layer."""
    recipe = load_recipe(recipe_name)
    if calibration is not None and not Path(calibration).is_dir():
        raise UsageError(f"calibration set not found: {calibration}")
    device = pick_device(device)
    source = resolve_model(model_spec)
    if recipe.backend == "llmcompressor":  # validate the block before any heavy work
        from optcli.quantize.llmcompressor import parse_modifiers

        parse_modifiers(recipe)
    started = time.perf_counter()
    if recipe.backend == "bnb":  # bitsandbytes quantizes while loading
        from optcli.quantize.bnb import quantize_bnb

        model, tokenizer, layers = quantize_bnb(source.path, recipe, device, trust_remote_code)
        return QuantizedModel(model, tokenizer, recipe, source, None, device, layers, started)

    model, tokenizer = load_model(source, dtype=recipe.dtype, trust_remote_code=trust_remote_code)
    calib = None
    if recipe.needs_calibration():
        if calibration is not None:
            calib = load_calibration_set(Path(calibration), tokenizer)
        else:
            calib = default_calibration_set(tokenizer, recipe.calibration.samples, recipe.calibration.seq_len, seed)
    layers: dict[str, Any] = {}
    if recipe.backend == "llmcompressor":
        from optcli.quantize.llmcompressor import quantize_llmcompressor

        total = getattr(model.config, "num_hidden_layers", 0)
        done = [0]

        def layer_done() -> None:
            done[0] += 1
            if progress is not None:
                progress(min(done[0], total), total)

        layers = quantize_llmcompressor(model, tokenizer, recipe, calib, layer_done)
    return QuantizedModel(model, tokenizer, recipe, source, calib, device, layers, started)


def save_artifact(qm: QuantizedModel, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write the artifact atomically: HF directory + tokenizer + optcli.json; returns the manifest."""
    with atomic_directory(Path(out), force) as tmp:
        manifest = write_artifact(qm, tmp)
    manifest["artifact"] = str(Path(out).absolute())
    return manifest


def write_artifact(qm: QuantizedModel, directory: Path) -> dict[str, Any]:
    if qm.recipe.backend == "llmcompressor":
        qm.model.save_pretrained(directory, save_compressed=True)
    else:
        qm.model.save_pretrained(directory)
    qm.tokenizer.save_pretrained(directory)
    _copy_generation_config(qm.source.path, directory)
    manifest = {
        "optcli_version": __version__,
        "recipe": qm.recipe.model_dump(),
        "source": {
            "spec": qm.source.spec,
            "path": str(qm.source.path),
            "weight_sha256": weight_hashes(qm.source.path),
        },
        "calibration": qm.calibration.manifest if qm.calibration is not None else None,
        "device": qm.device,
        "duration_s": round(time.perf_counter() - qm.started, 3),
        "memory": peak_memory_bytes(qm.device),
        "size_bytes": {"before": directory_weight_bytes(qm.source.path), "after": directory_weight_bytes(directory)},
        "layers": qm.layers,
        "versions": library_versions(),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def quantize(
    model_spec: str,
    recipe_name: str,
    out: str | Path,
    calibration: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Quantize `model_spec` with a recipe into `out`; returns the manifest written there.

    The artifact is built in a temporary sibling of `out` from the start and renamed into place
    only when complete, so a run killed at any point never leaves a half-written `out`.
    """
    out = Path(out)
    with atomic_directory(out, force) as tmp:
        qm = apply_recipe(model_spec, recipe_name, calibration, device, trust_remote_code, seed, progress)
        manifest = write_artifact(qm, tmp)
    manifest["artifact"] = str(out.absolute())
    return manifest


def _copy_generation_config(src: Path, dst: Path) -> None:
    path = Path(src) / "generation_config.json"
    if path.is_file() and not (dst / "generation_config.json").exists():
        (dst / "generation_config.json").write_text(path.read_text())
