"""`optcli quantize`: load a model, apply a recipe, write an artifact with an `optcli.json` manifest.

One backend per file (llmcompressor.py, bnb.py); this module only orchestrates: resolve inputs
(all bad input is reported before any work starts), pick a device, calibrate, run the backend,
save atomically, and record what was done.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from optcli import __version__
from optcli.errors import UsageError
from optcli.quantize.artifact import atomic_directory, directory_weight_bytes

MANIFEST = "optcli.json"


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"optcli": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "llmcompressor", "compressed-tensors", "bitsandbytes", "triton"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def pick_device(device: str) -> str:
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda (got '{device}')")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def peak_memory_bytes(device: str) -> dict[str, int | None]:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    gpu = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"host_peak_rss_bytes": rss, "gpu_peak_allocated_bytes": gpu}


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
    from optcli.calibration import default_calibration_set, load_calibration_set
    from optcli.models import load_model, resolve_model
    from optcli.recipes import load_recipe

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
    from optcli.models import weight_hashes

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
