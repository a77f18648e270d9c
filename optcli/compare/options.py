"""`CompareOptions`: `optcli compare`'s own flags (the workload and engine flags are profile's), each declared
with its help (`config.option`), so `cli/flags.py` makes the command's options from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from optcli.config import option


@dataclass(frozen=True)
class CompareOptions:
    recipes: str | None = option(None, "--recipes", help=(
        "Recipes to compare, comma-separated (optcli recipes list, or auto:BITS)."))
    optimizations: bool = option(False, "--optimizations", help=(
        "The serving-optimizations table instead: each optimization switched off in turn against the full engine."))
    recipe: str | None = option(None, "--recipe",
                                help="With --optimizations: the quantization recipe of its quantization row.")
    kpi: Path | None = option(None, "--kpi", help=(
        "KPI gates (YAML) every candidate is checked against; none passing exits 3."))
    objective: str = option("cost", "--objective", help=(
        "How the best passing candidate is chosen: cost, latency, throughput or memory."))
    tasks: str | None = option(None, "--tasks", help=(
        "lm-evaluation-harness tasks, comma-separated, for every candidate and the source."))
    tasks_path: Path | None = option(None, "--tasks-path", help="Directory of local task YAMLs.")
    limit: int | None = option(None, "--limit", min=1, help="With --tasks: documents per task.")
    num_fewshot: int | None = option(None, "--num-fewshot", min=0, help="With --tasks: few-shot examples.")
    eval_text: Path | None = option(None, "--eval-text", help=(
        "Text for perplexity/KLD/top-1 (default: the builtin corpus's heldout.txt)."))
    gpu_hour_cost: float | None = option(None, "--gpu-hour-cost",
                                         help="USD per hour of the machine, for cost per 1K tokens.")
    out: Path | None = option(None, "--out", "-o", help=(
        "Directory for report.json/.md/.html, pareto.png, profiles/ and best/."))
    cache_dir: Path | None = option(None, "--cache-dir", help=(
        "Artifact cache (default: $OPTCLI_CACHE/compare, else ~/.cache/optcli/compare)."))
    clear_cache: bool = option(False, "--clear-cache", help="Remove the cached artifacts (alone: and exit).")
    calibration: Path | None = option(None, "--calibration",
                                      help="Calibration set (optcli calibrate) for every recipe.")
