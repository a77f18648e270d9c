"""`optcli compare MODEL --optimizations`: check the input, quantize the chosen recipe (through the compare
cache), measure every row (optimizations.py) and write the table."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from optcli.bench.workload import Workload
from optcli.checkpoints.resolve import resolve_model
from optcli.compare import cache
from optcli.compare.optimizations import measure_optimizations, optimization_cells
from optcli.compare.output import check_compare_out, write_compare_reports
from optcli.config import EngineConfig
from optcli.engine.loading.placement import resolve_device
from optcli.errors import UsageError
from optcli.quantize.pipeline import refuse_quantized
from optcli.quantize.recipes import load_recipe
from optcli.roi.hardware import describe
from optcli.util.env import library_versions

NOTES = (
    "static batching keeps a finished request in its batch as padding until the batch ends (each decode step "
    "computes a row for it, as a padded batch does); prompts are not padded to the batch's longest, so "
    "continuous batching's measured gain is, if anything, understated",
    "prefix caching is measured on a shared-prefix workload (every prompt starts with one of the prefixes); its "
    "gain is mostly TTFT: the shared tokens are prefilled once",
)
METHOD = ("each row: the full engine against the same engine with that optimization switched off, the same "
          "workload, in interleaved repeats (ABBA, both engines resident, the same KV-cache bytes); reductions and "
          "increases are medians of the paired per-repeat ratios with 95% intervals (optcli/bench/stats.py); cost "
          "reduction = 1 - 1 / (throughput ratio at load) at a fixed price per hour")


def compare_optimizations(model: str, workload: Workload, config: EngineConfig, recipe: str | None = None,
                          out: Path | None = None, cache_dir: Path | None = None, calibration: Path | None = None,
                          seed: int = 0, kv_cache_dtype: str | None = None,
                          step: Callable[[str], None] | None = None) -> dict:
    step = step or (lambda message: None)
    if recipe is not None:
        load_recipe(recipe)
    if workload.prefix_len == 0 and workload.dataset:
        raise UsageError("--optimizations adds a shared prefix for its prefix-caching row: not with --dataset")
    if out is not None:
        check_compare_out(Path(out))
    source = resolve_model(model)
    refuse_quantized(source.path)
    started = time.perf_counter()
    device = resolve_device(config.device)
    config = config.with_options(device=device)
    artifact = None
    if recipe is not None:
        root = Path(cache_dir) if cache_dir else cache.default_cache_dir()
        entry, _ = cache.ensure(root, source, model, recipe, calibration, seed, device, step)
        artifact = resolve_model(str(entry.path))
    rows = measure_optimizations(source, artifact, recipe, workload, config, step, kv_cache_dtype)
    report = {
        "kind": "optimizations", "model": model, "rows": rows, "method": METHOD, "notes": list(NOTES),
        "workload": {k: v for k, v in asdict(workload).items() if k not in ("dataset", "levels")}
        | {"headline": workload.headline().label},
        "engine": config.as_dict(), "hardware": describe(device),
        "timing_s": round(time.perf_counter() - started, 1), "versions": library_versions(),
    }
    if out is not None:
        write_compare_reports(report, Path(out), cells=optimization_cells(report))
    return report
