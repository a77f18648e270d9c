"""Human output of `optcli roi` (rich tables); the --json object carries the same figures."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _usd(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"${value:,.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"${value:.3g}"


def _gib(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def render_warnings(result: dict, console: Console) -> None:
    """One yellow line per warning (a device priced from another's throughput, a busy machine's report)."""
    for warning in result.get("warnings") or []:
        console.print(f"[yellow]warning: {escape(warning)}[/yellow]", highlight=False, soft_wrap=True)


def render_roi(result: dict, console: Console, plot: Path | None = None) -> None:
    est = result["estimate"]
    tag = " (estimate)" if est else ""
    inputs = result["inputs"]
    title = "optcli roi · ESTIMATE (roofline from the model config, not measured)" if est else "optcli roi"
    table = Table(title=title)
    for col in ("figure", "value", "from"):
        table.add_column(col, justify="right" if col == "value" else "left")

    def source(name: str) -> str:
        return (inputs.get(name) or {}).get("source") or ""

    def value(name: str):
        return (inputs.get(name) or {}).get("value")

    gpu = inputs.get("gpu") or {}
    if gpu.get("resolution"):  # say which entry an abbreviated or ambiguous --gpu name picked
        console.print(f"--gpu {gpu['resolution']}", soft_wrap=True)
    if gpu.get("value"):
        table.add_row("GPU", gpu["value"], gpu.get("source") or "")
    table.add_row(f"total tok/s{tag}", f"{value('total_tok_s'):,.1f}", source("total_tok_s"))
    table.add_row("GPU price / hour", _usd(value("gpu_hour_cost_usd")), source("gpu_hour_cost_usd"))
    volume = f"{value('requests_per_day'):,.0f} × {value('tokens_per_request'):,.0f}"
    table.add_row("requests/day × tokens/request", volume,
                  f"{source('requests_per_day')}, {source('tokens_per_request')}")
    table.add_row(f"USD per 1K tokens{tag}", _usd(result["usd_per_1k_tokens"], 4), "")
    table.add_row(f"USD per 1K output tokens{tag}", _usd(result["usd_per_1k_output_tokens"], 4), "")
    table.add_row(f"daily cost{tag}", _usd(result["daily_cost_usd"]), "")
    table.add_row(f"annual cost{tag}", _usd(result["annual_cost_usd"]), "")
    if result["baseline_annual_cost_usd"] is not None:
        table.add_row("baseline annual cost", _usd(result["baseline_annual_cost_usd"]),
                      source("baseline_usd_per_1k_tokens"))
        table.add_row(f"annual savings{tag}", _usd(result["annual_savings_usd"]), "")
        months = result["payback_months"]
        table.add_row("payback", "n/a" if months is None else f"{months:.1f} months",
                      f"implementation {_usd(value('implementation_cost_usd'))} ({source('implementation_cost_usd')})")
        table.add_row("recommendation", f"[bold]{result['recommendation']}[/bold]", "")
    if result["replicas"] is not None:
        table.add_row(f"replicas for {value('target_rps'):g} req/s{tag}", str(result["replicas"]), "")
    console.print(table)
    if result["baseline_annual_cost_usd"] is None:
        console.print("no baseline: pass --baseline-report or --baseline-usd-per-1k-tokens for savings and payback")
    _render_plan(result.get("plan"), console, tag)
    _render_capacity(result.get("capacity"), console, tag, plot)


def _render_plan(plan: dict | None, console: Console, tag: str) -> None:
    if not plan:
        return
    if plan.get("roofline"):
        r = plan["roofline"]
        console.print(f"roofline estimate: batch {r['batch_size']}, {r['prompt_len']} prompt + {r['output_len']} "
                      f"generated tokens: decode is {r['decode_bound']}-bound ({r['compute']} peak); "
                      f"{r['requests_s']:.2f} req/s, {r['e2e_ms']:.0f} ms per request (estimate)")
    if plan.get("gpu"):
        console.print(f"[bold]recipes for {plan['gpu']}[/bold]")
        for i, rec in enumerate(plan.get("recommendations", [])):
            console.print(f"  {'→' if i == 0 else ' '} {rec['recipe']}: {rec['reason']}")
    mem = plan.get("memory")
    if mem and "error" in mem:
        console.print(f"memory plan skipped: {mem['error']}")
    elif mem:
        fits = "fits" if mem["fits"] else "[red]does not fit[/red]"
        console.print(f"memory plan ({mem['recipe']}{tag}): weights {_gib(mem['weights_bytes'])}, KV "
                      f"{mem['kv_bytes_per_token'] / 1024:.1f} KiB/token, overhead {_gib(mem['overhead_bytes'])} of "
                      f"{_gib(mem['usable_bytes'])} usable: {mem['num_seqs']} × {mem['context_len']} tokens {fits}; "
                      f"at most {mem['max_concurrent_seqs']} concurrent sequences of {mem['context_len']} tokens")


def _render_capacity(cap: dict | None, console: Console, tag: str, plot: Path | None) -> None:
    if not cap:
        return
    where = f" at concurrency {cap['concurrency']}" if cap["concurrency"] is not None else ""
    p95 = f" (p95 {cap['p95_ms']:.0f} ms)" if cap["p95_ms"] is not None else ""
    console.print(f"one replica: {cap['per_replica_rps']:.2f} req/s{where}{p95}{tag}; from {cap['source']}",
                  highlight=False)
    if cap["replicas"] is not None:
        console.print(f"replicas: {cap['replicas']} (fleet {_usd(cap['fleet_daily_cost_usd'])}/day at 24 h)")
    auto = cap.get("autoscaling")
    if not auto:
        return
    table = Table(title=f"autoscaling replay{tag}")
    for col in ("time", "req/s", "replicas", "utilization", "p95 ms", "cost"):
        table.add_column(col, justify="left" if col == "time" else "right")
    for row in auto["rows"]:
        p95 = "saturated" if row["p95_ms"] is None else f"{row['p95_ms']:.0f}"
        style = "" if row["slo_met"] else "[red]"
        table.add_row(row["time"], f"{row['requests_s']:g}", str(row["replicas"]), f"{row['utilization']:.0%}",
                      f"{style}{p95}", _usd(row["cost_usd"]))
    console.print(table)
    console.print(f"total {_usd(auto['total_cost_usd'])} for {auto['replica_hours']:.1f} replica-hours; peak "
                  f"{auto['peak_replicas']} replicas; {auto['intervals_over_slo']} interval(s) over the SLO")
    if plot is not None:
        console.print(f"plot: {plot}")
