"""`optcli compare MODEL --optimizations`: the article's second table, measured. The same workload runs
through the full engine and through the engine with one optimization switched off, in `profile`'s
interleaved repeats (`bench/repeats.measure_models`: ABBA, both resident, the same KV-cache bytes), and
each row gives what the optimization buys: the reduction of p50/p95 E2E latency and TTFT, the throughput
increase at the workload's load level, and the cost reduction (at a fixed price per GPU-hour, cost per
token is 1 / throughput), each with the 95% interval of its paired ratio (`bench/stats.py`).

A row that cannot be measured here says why and carries nulls (CUDA graphs and the Triton kernels on a
CPU; a KV-cache dtype while the engine has only one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from optcli.bench.model_run import ModelRun
from optcli.bench.repeats import measure_models
from optcli.bench.stats import ratio_interval
from optcli.bench.workload import Workload
from optcli.config import EngineConfig
from optcli.report.markdown import NA, fmt_interval

SHARED_PREFIX_TOKENS = 128  # the prefix-caching row's system prompt when the workload has none
LATENCIES = {"e2e_p50": "latency_ms.e2e.p50", "e2e_p95": "latency_ms.e2e.p95",
             "ttft_p50": "latency_ms.ttft.p50", "ttft_p95": "latency_ms.ttft.p95"}
THROUGHPUT_AT_LOAD = "throughput.online_output_tok_s"
THROUGHPUT_OFFLINE = "throughput.output_tok_s"


@dataclass(frozen=True)
class Toggle:
    """One row: the optimization, the engine options that switch it off, and the workload it shows on."""

    name: str
    off: dict
    what_off: str
    shared_prefix: bool = False


def toggles(device: str, kv_cache_dtype: str | None) -> list[Toggle | dict]:
    """The rows in order; a dict is a row that cannot be measured here (with why)."""
    gpu = device.startswith("cuda")
    rows: list[Toggle | dict] = [
        Toggle("continuous batching", {"scheduler_policy": "static"},
               "static (\"dynamic\") batching: batches of max_num_seqs closed after max_wait_ms, run to completion"),
        Toggle("prefix caching", {"enable_prefix_caching": False}, "no prefix cache (shared-prefix workload)",
               shared_prefix=True),
        Toggle("chunked prefill", {"enable_chunked_prefill": False}, "whole prompts only, never cut across steps"),
    ]
    if gpu:
        rows.append(Toggle("CUDA graphs", {"enforce_eager": True}, "eager decode (--enforce-eager)"))
    else:
        rows.append(_unmeasured("CUDA graphs", "no GPU here: CUDA graphs capture GPU decode steps"))
    rows.append(_unmeasured("Triton kernels", "the engine has no GPU path without its Triton kernels to compare "
                            "against" if gpu else "no GPU here: the fused Triton kernels run on a GPU only"))
    # the full engine runs the --kv-cache-dtype the user named; the row switches it back to the model's dtype
    if kv_cache_dtype not in (None, "auto"):
        rows.append(Toggle(f"KV cache {kv_cache_dtype}", {"kv_cache_dtype": "auto"}, "KV cache in the model's dtype"))
    else:
        rows.append(_unmeasured("KV-cache dtype", "pass --kv-cache-dtype fp8 or int8 to compare it against the "
                                "model's dtype"))
    return rows


def _unmeasured(name: str, why: str) -> dict:
    return {"optimization": name, "switched_off": None, "workload": None, "available": False, "why": why,
            **{k: None for k in ("latency_reduction", "throughput_increase", "offline_throughput_increase",
                                 "cost_reduction")}}


def _interval(cand: ModelRun, base: ModelRun, field: str):
    return ratio_interval(cand.figure_runs(field), base.figure_runs(field))


def _reduction(interval) -> dict | None:
    """1 - ratio (full / off, for a latency): the share of the latency the optimization removes."""
    if interval is None:
        return None
    def flip(v):
        return None if v is None else 1 - v

    return {"value": flip(interval.median), "ci_low": flip(interval.high), "ci_high": flip(interval.low)}


def _increase(interval) -> dict | None:
    if interval is None:
        return None
    return {"ratio": interval.median, "ci_low": interval.low, "ci_high": interval.high}


def _cost(interval) -> dict | None:
    """1 - 1/throughput ratio: the share of the cost per token saved at the same price per hour."""
    if interval is None:
        return None
    def flip(v):
        return None if v is None else 1 - 1 / v

    return {"value": flip(interval.median), "ci_low": flip(interval.low), "ci_high": flip(interval.high)}


def row_from_runs(name: str, what_off: str, workload_label: str, cand: ModelRun, base: ModelRun) -> dict:
    return {
        "optimization": name, "switched_off": what_off, "workload": workload_label, "available": True, "why": None,
        "latency_reduction": {k: _reduction(_interval(cand, base, f)) for k, f in LATENCIES.items()},
        "throughput_increase": _increase(_interval(cand, base, THROUGHPUT_AT_LOAD)),
        "offline_throughput_increase": _increase(_interval(cand, base, THROUGHPUT_OFFLINE)),
        "cost_reduction": _cost(_interval(cand, base, THROUGHPUT_AT_LOAD)),
        "full": {"online_output_tok_s": cand.online["throughput"]["output_tok_s"],
                 "ttft_p50_ms": cand.online["latency_ms"]["ttft"]["p50"]},
        "off": {"online_output_tok_s": base.online["throughput"]["output_tok_s"],
                "ttft_p50_ms": base.online["latency_ms"]["ttft"]["p50"]},
    }


def shared_prefix(workload: Workload) -> Workload:
    return workload if workload.prefix_len else replace(workload, prefix_len=SHARED_PREFIX_TOKENS)


def measure_optimizations(source, artifact, recipe: str | None, workload: Workload, config: EngineConfig,
                          step: Callable[[str], None], kv_cache_dtype: str | None = None) -> list[dict]:
    """Every row of the table, measured in turn (each pair in interleaved repeats, then released)."""
    rows = []
    for toggle in toggles(config.device, kv_cache_dtype):
        if isinstance(toggle, dict):
            rows.append(toggle)
            continue
        load = shared_prefix(workload) if toggle.shared_prefix else workload
        step(f"{toggle.name}: full engine against {toggle.what_off}")
        cand, base, _ = measure_models(source, source, load, None, config, step,
                                       baseline_config=config.with_options(**toggle.off))
        label = f"shared prefix of {load.prefix_len} tokens" if toggle.shared_prefix else "the workload"
        rows.append(row_from_runs(toggle.name, toggle.what_off, label, cand, base))
    if artifact is None:
        rows.append(_unmeasured("quantization", "pass --recipe NAME to measure a quantization recipe"))
    else:
        step(f"quantization ({recipe}): the artifact against the source")
        cand, base, _ = measure_models(artifact, source, workload, None, config, step)
        rows.append(row_from_runs(f"quantization ({recipe})", "the unquantized source", "the workload", cand, base))
    return rows


OPT_HEADERS = ["optimization", "switched off", "workload", "E2E p50 reduction", "E2E p95 reduction",
               "TTFT p50 reduction", "TTFT p95 reduction", "throughput increase (at load)",
               "throughput increase (offline)", "cost reduction"]


def _share(cell: dict | None) -> str:
    if cell is None or cell.get("value") is None:
        return "n/a"
    if cell.get("ci_low") is None:
        return f"{cell['value']:+.0%}"
    return f"{cell['value']:+.0%} [{cell['ci_low']:+.0%}, {cell['ci_high']:+.0%}]"


def _times(cell: dict | None) -> str:
    return NA if cell is None else fmt_interval(cell)


def optimization_cells(report: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for row in report["rows"]:
        if not row["available"]:
            rows.append([row["optimization"], "n/a (" + row["why"] + ")", "-"] + ["n/a"] * 7)
            continue
        lat = row["latency_reduction"]
        rows.append([row["optimization"], row["switched_off"], row["workload"],
                     *(_share(lat[k]) for k in LATENCIES), _times(row["throughput_increase"]),
                     _times(row["offline_throughput_increase"]), _share(row["cost_reduction"])])
    return OPT_HEADERS, rows
