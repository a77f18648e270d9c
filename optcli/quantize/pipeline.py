"""The quantize pipeline: load a model, apply a recipe, write an artifact with an `optcli.json` manifest.

One backend per file (llmcompressor.py, bnb.py); this module only orchestrates: resolve inputs
(all bad input is reported before any work starts), pick a device, calibrate, run the backend,
save atomically, and record what was done. Recipes (the YAML schema and the shipped ones) are in
recipes.py.

quantize may import calibration, checkpoints, builtin, config, errors and util; never cli, bench,
serve or roi (the engine runs what quantize writes; quantize does not need the engine, only its CPU
capability flags, `engine/kernels/cpu_caps.py`, for the calibration dtype).
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
from optcli.util.fs import ARTIFACT

MANIFEST = ARTIFACT.marker  # optcli.json: what makes a directory an artifact (util.fs)


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
    allocation: dict[str, Any] | None = None  # auto:BITS: the budget, the bits spent, the upgrades taken
    work_dtype: dict[str, str] | None = None  # the dtype it was calibrated and quantized in, and why


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
    refuse_quantized(source.path)
    if recipe.backend == "llmcompressor":  # validate the block before any heavy work
        from optcli.quantize.llmcompressor import parse_modifiers

        parse_modifiers(recipe)
    started = time.perf_counter()
    if recipe.backend == "bnb":  # bitsandbytes quantizes while loading
        from optcli.quantize.bnb import quantize_bnb

        model, tokenizer, layers = quantize_bnb(source.path, recipe, device, trust_remote_code)
        return QuantizedModel(model, tokenizer, recipe, source, None, device, layers, started)

    work_dtype, work_reason = calibration_dtype(recipe, device)
    model, tokenizer = load_model(source, dtype=work_dtype, trust_remote_code=trust_remote_code)
    calib = None
    if recipe.needs_calibration():
        if calibration is not None:
            calib = load_calibration_set(Path(calibration), tokenizer)
        else:
            calib = default_calibration_set(tokenizer, recipe.calibration.samples, recipe.calibration.seq_len, seed)
    layers: dict[str, Any] = {}
    allocation = None
    if recipe.budget_bits is not None:  # auto:BITS: a rung per layer first, then an ordinary GPTQ run
        from optcli.quantize.mixed import plan_mixed

        recipe, allocation, layers = plan_mixed(model, recipe, calib, calibration, source)
    if recipe.backend == "llmcompressor":
        from optcli.quantize.llmcompressor import quantize_llmcompressor

        total = getattr(model.config, "num_hidden_layers", 0)
        done = [0]

        def layer_done() -> None:
            done[0] += 1
            if progress is not None:
                progress(min(done[0], total), total)

        done_layers = quantize_llmcompressor(model, tokenizer, recipe, calib, layer_done)
        layers = {name: {**done_layers.get(name, {}), **layers.get(name, {})} for name in {*done_layers, *layers}}
    for entry in layers.values() if allocation is not None else ():
        entry.setdefault("scheme", "unquantized (auto: kept in bf16)")
    if work_dtype != recipe.dtype:
        to_dtype(model, recipe.dtype)
    return QuantizedModel(model, tokenizer, recipe, source, calib, device, dict(sorted(layers.items())), started,
                          allocation, {"dtype": work_dtype, "reason": work_reason})


def calibration_dtype(recipe, device: str) -> tuple[str, str]:
    """(dtype, reason) the model is calibrated and quantized in: the recipe's, except a bf16 or fp16 recipe
    calibrated on a CPU without native bf16 (AVX-512 BF16 or AMX), where torch emulates 16-bit matmuls
    through fp32 conversions: there it runs in fp32 and the result is cast to the recipe's dtype before
    saving. Same artifact layout and dtype, fp32 rather than bf16 rounding inside the search, and much
    faster: llm-compressor's AWQ on stories260K (64 x 256 calibration tokens) took 217 s in bf16 on an
    AVX2-only Zen 3, its attention matmuls 21 ms a call against 1.3 ms in fp32 (2026-12-07)."""
    if recipe.dtype == "float32" or not recipe.needs_calibration() or not device.startswith("cpu"):
        return recipe.dtype, "the recipe's dtype"
    from optcli.engine.kernels.cpu_caps import cpu_flags, flags_caps

    if flags_caps(cpu_flags()).native_bf16:
        return recipe.dtype, "the recipe's dtype (native CPU bf16)"
    return "float32", (f"float32, cast to the recipe's {recipe.dtype} after quantizing: this CPU has no native "
                       "bf16 (AVX-512 BF16 or AMX), where torch's 16-bit matmuls are emulated and many times slower")


def to_dtype(model, dtype: str) -> None:
    """Cast a quantized model's floating weights, scales and saved buffers to `dtype`, as if loaded in it;
    buffers a checkpoint does not hold (RoPE's inverse frequencies) stay as computed, in fp32, as they are
    when transformers loads a bf16 model. The integer levels survive: a weight GPTQ/AWQ left at level q x
    scale, with the weight and the scale each rounded to bf16 (2^-9 relative), divides back to q within
    |q| x 2^-8 < 0.5 for 4-bit levels and for int8's up to 127 (-128 clamps), so compression packs the same
    integers; FP8's 3 mantissa bits are far coarser."""
    import torch

    target = getattr(torch, dtype)
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(target)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to(target)
    model.config.dtype = target


def refuse_quantized(path: Path) -> None:
    """Exit 2 for a model whose weights are already quantized: a recipe finds no dense weights to round
    there (llm-compressor fails deep inside, "'Linear' object has no attribute 'weight'"), and quantizing
    twice would compound the error anyway; an optcli artifact's manifest names the source to use instead."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # unreadable configs are the loader's to report
    if not isinstance(config, dict):
        return
    quant = config.get("quantization_config") or config.get("compression_config")  # the latter: older compressed-tensors
    if not quant:
        return
    method = (quant.get("quant_method") if isinstance(quant, dict) else None) or "quantization_config in config.json"
    hint = "quantize the unquantized model instead"
    if ARTIFACT.made(Path(path)):
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
        recipe = (manifest.get("recipe") or {}).get("name")
        method = f"optcli recipe {recipe}" if recipe else method
        source = (manifest.get("source") or {}).get("spec")
        hint = f"quantize its source instead ({source})" if source else hint
    raise UsageError(f"{path}: already quantized ({method}): {hint}")


def save_artifact(qm: QuantizedModel, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write the artifact atomically: HF directory + tokenizer + optcli.json; returns the manifest."""
    with atomic_directory(Path(out), force, ARTIFACT, {"source model": qm.source.path}) as tmp:
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
        "work_dtype": qm.work_dtype,
        "duration_s": round(time.perf_counter() - qm.started, 3),
        "memory": peak_memory_bytes(qm.device),
        "size_bytes": {"before": directory_weight_bytes(qm.source.path), "after": directory_weight_bytes(directory)},
        "layers": qm.layers,
        "versions": library_versions(),
    }
    if qm.allocation is not None:
        from optcli.quantize.mixed import recipe_yaml

        manifest["allocation"] = qm.allocation
        (directory / qm.allocation["recipe_file"]).write_text(recipe_yaml(qm.recipe))
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
    # resolved here too (cheap: headers only) so that --out is checked against the source before any work
    inputs = {"source model": resolve_model(model_spec).path, "calibration set": calibration}
    with atomic_directory(out, force, ARTIFACT, inputs) as tmp:
        qm = apply_recipe(model_spec, recipe_name, calibration, device, trust_remote_code, seed, progress)
        manifest = write_artifact(qm, tmp)
    manifest["artifact"] = str(out.absolute())
    return manifest


def _copy_generation_config(src: Path, dst: Path) -> None:
    path = Path(src) / "generation_config.json"
    if path.is_file() and not (dst / "generation_config.json").exists():
        (dst / "generation_config.json").write_text(path.read_text())
