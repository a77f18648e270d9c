"""`optcli compare MODEL --recipes ...`: quantize each recipe (or reuse its cached artifact), measure every
artifact against the source as `profile` does, and build the article's first table from the reports.

How the speed figures are taken: each artifact runs `profile`'s interleaved repeats (ABBA) against the
source, both models resident when memory allows, one at a time otherwise (`bench/repeats.py`). Every
ratio in the table is therefore an artifact against the source measured in the same minutes, with its
95% interval over the paired repeats (`bench/stats.py`); a busy moment lands on both sides of a pair, and
ratios stay comparable across artifacts measured minutes apart, where absolute tok/s would not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from optcli import __version__
from optcli.bench.args import AccuracyArgs, OutputArgs, ProfileArgs, TargetArgs
from optcli.bench.eval_text import read_eval_text
from optcli.bench.kpi import load_kpi
from optcli.bench.profile import profile
from optcli.bench.tasks import task_manager
from optcli.bench.workload import Workload
from optcli.checkpoints.resolve import resolve_model
from optcli.compare import cache
from optcli.compare.access import ProfileView
from optcli.compare.output import check_compare_out, publish_best, write_compare_reports
from optcli.compare.table import OBJECTIVES, artifact_row, assign_best_for, choose_best, parameter_count, source_row
from optcli.config import EngineConfig
from optcli.engine.loading.placement import resolve_device
from optcli.errors import KpiFailed, UsageError
from optcli.quantize.pipeline import refuse_quantized
from optcli.quantize.recipes import load_recipe
from optcli.util.env import library_versions


@dataclass
class CompareRequest:
    """Everything `compare` needs; checked as a whole (`check`) before any work starts."""

    model: str
    recipes: list[str]
    workload: Workload = field(default_factory=Workload)
    config: EngineConfig = field(default_factory=EngineConfig)
    kpi_file: Path | None = None
    objective: str = "cost"
    out: Path | None = None
    eval_text: Path | None = None
    gpu_hour_cost: float | None = None
    tasks: list[str] | None = None
    tasks_path: Path | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    cache_dir: Path | None = None
    calibration: Path | None = None
    seed: int = 0


def check(req: CompareRequest):
    """Exit 2 for any bad input, naming it, before a model loads. Returns the resolved source."""
    if not req.recipes:
        raise UsageError("--recipes needs at least one recipe (optcli recipes list)")
    duplicates = sorted({r for r in req.recipes if req.recipes.count(r) > 1})
    if duplicates:
        raise UsageError(f"--recipes names {', '.join(duplicates)} more than once")
    for recipe in req.recipes:
        load_recipe(recipe)
    if req.objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)} (got '{req.objective}')")
    if req.gpu_hour_cost is not None and req.gpu_hour_cost < 0:
        raise UsageError("--gpu-hour-cost must be >= 0")
    if req.kpi_file is not None:
        load_kpi(req.kpi_file)
    if req.eval_text is not None:
        read_eval_text(req.eval_text)
    if req.calibration is not None and not Path(req.calibration).is_dir():
        raise UsageError(f"--calibration: calibration set not found: {req.calibration}")
    if req.tasks:
        task_manager(req.tasks, req.tasks_path)
    if req.out is not None:
        check_compare_out(Path(req.out))
    source = resolve_model(req.model)
    refuse_quantized(source.path)
    return source


def compare(req: CompareRequest, step: Callable[[str], None] | None = None) -> dict:
    """Run the comparison and write the reports; raises KpiFailed (exit 3) after writing them when a KPI
    file was given and no candidate passes it."""
    step = step or (lambda message: None)
    started = time.perf_counter()
    source = check(req)
    root = Path(req.cache_dir) if req.cache_dir is not None else cache.default_cache_dir()
    device = resolve_device(req.config.device)
    config = req.config.with_options(device=device)
    artifacts, hits, quantize_s = {}, [], {}
    for recipe in req.recipes:
        entry, seconds = cache.ensure(root, source, req.model, recipe, req.calibration, req.seed, device, step)
        if seconds is None:
            hits.append(recipe)
        else:
            quantize_s[recipe] = seconds
        artifacts[recipe] = entry.path
    measured_at = time.perf_counter()
    views = {}
    for recipe, path in artifacts.items():
        step(f"measuring {recipe} against the source")
        views[recipe] = ProfileView(_profile_one(req, recipe, path, config, step))
    parameters = parameter_count(source.path)
    first = next(iter(views.values()), None)
    rows = [source_row(source.path, parameters, first, req.gpu_hour_cost, device)]
    rows += [artifact_row(r, artifacts[r], parameters, views[r], device, req.kpi_file is not None) for r in artifacts]
    assign_best_for(rows)
    best = choose_best(rows, req.objective)
    report = {
        "model": req.model, "source": str(source.path), "objective": req.objective,
        "rows": rows, "best": best["method"] if best else None,
        "best_artifact": None,
        "kpi": None if req.kpi_file is None else {"file": str(req.kpi_file), "passed": best is not None},
        "cache": {"dir": str(root), "reused": hits, "quantized": sorted(quantize_s), "quantize_s": quantize_s},
        "workload": first.figure("workload") if first else None,
        "hardware": first.hardware() if first else None,
        "contention": {r: v.contention_warning() for r, v in views.items() if v.contention_warning()},
        "method": __doc__.split("How the speed figures are taken: ")[1].strip().replace("\n", " "),
        "timing_s": {"quantize": round(measured_at - started, 1), "measure": round(time.perf_counter() - measured_at, 1)},
        "versions": first.versions() if first else {"optcli": __version__, **library_versions()},
    }
    if best is not None and req.out is not None:
        report["best_artifact"] = str(publish_best(Path(best["artifact"]), Path(req.out)))
    if req.out is not None:
        write_compare_reports(report, Path(req.out))
    if req.kpi_file is not None and best is None:
        raise KpiFailed(no_passer_message(rows), report)
    return report


def no_passer_message(rows: list[dict]) -> str:
    parts = []
    for row in rows[1:]:
        failing = row["kpi"]["failing"] if row["kpi"] else []
        gates = ", ".join(f"{c['name']} (value {_fmt(c.get('value'))}, threshold {_fmt(c.get('threshold'))})"
                          for c in failing) or "no gate failed, but no figure to rank it by"
        parts.append(f"{row['method']}: {gates}")
    return "no candidate passes the KPI gates: " + "; ".join(parts)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _profile_one(req: CompareRequest, recipe: str, artifact: Path, config: EngineConfig, step):
    """`profile` of one artifact against the source; its full report under DIR/profiles/<recipe>."""
    out = Path(req.out) / "profiles" / cache.entry_name(recipe, "").rstrip("-") if req.out is not None else None
    try:
        accuracy = AccuracyArgs(baseline=req.model, eval_text=req.eval_text,
                                tasks=",".join(req.tasks) if req.tasks else None, tasks_path=req.tasks_path,
                                limit=req.limit, num_fewshot=req.num_fewshot)
        outputs = OutputArgs(out=out, kpi=req.kpi_file, gpu_hour_cost=req.gpu_hour_cost)
        return profile(ProfileArgs(str(artifact), req.workload, accuracy, TargetArgs(), outputs, config), step)
    except KpiFailed as exc:  # a failed gate is this candidate's verdict, not the comparison's end
        return exc.report
