"""`optcli profile`: the flags, and the terminal summary of a report (the source side by side with the artifact)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from optcli.bench.dataset import load_dataset
from optcli.bench.rates import RATE_TYPES, parse_exclusion, plan_levels
from optcli.bench.vllm_server import VllmOptions
from optcli.bench.workload import DEFAULT_REPEATS, Workload, parse_output_len, parse_prompt_len, parse_synthetic_data
from optcli.cli.app import app
from optcli.cli.common import (
    ENGINE,
    DeviceOpt,
    DtypeOpt,
    EnforceEagerOpt,
    GpuMemoryOpt,
    LmHeadOpt,
    MaxModelLenOpt,
    MaxNumSeqsOpt,
    emit_json,
    engine_config,
    err,
    fail,
    guard,
    mib,
    out,
)
from optcli.config import REQUEST_TIMEOUT_S
from optcli.errors import KpiFailed, UsageError
from optcli.report.markdown import (
    comparison_caption,
    comparison_table,
    comparison_warnings,
    contention_warning,
    head_line,
    kpi_value,
    roofline_line,
    throughput_notes,
)


@app.command()
def profile(
    model: Annotated[str, typer.Argument(help="Model or artifact to profile (or the served model name with --endpoint).")],
    baseline: Annotated[str | None, typer.Option("--baseline", help="Reference model for accuracy (default: the artifact's source).")] = None,
    eval_text: Annotated[Path | None, typer.Option("--eval-text", help="Text for accuracy (default: the builtin corpus's heldout.txt).")] = None,
    baseline_endpoint: Annotated[str | None, typer.Option("--baseline-endpoint", help="With --endpoint: a server of the baseline, for endpoint accuracy (or --baseline MODEL, run locally).")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="lm-evaluation-harness tasks, comma-separated, run through the engine for the model and its baseline.")] = None,
    tasks_path: Annotated[Path | None, typer.Option("--tasks-path", help="Directory of local task YAMLs (+ their JSONL data), offline.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="With --tasks: documents per task.")] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", min=0, help="With --tasks: few-shot examples.")] = None,
    accuracy_backend: Annotated[str, typer.Option("--accuracy-backend", help="engine: both models through our engine as served (default); transformers: the cross-check.")] = "engine",
    requests: Annotated[int, typer.Option("--requests", "--max-requests", "--num-prompts", min=1, help="Requests per phase and per load level (at most, with --max-seconds).")] = 32,
    prompt_len: Annotated[str, typer.Option("--prompt-len", help="Prompt lengths, uniform in [A, B) (N:N+1 for N tokens each).")] = "16:64",
    output_len: Annotated[str, typer.Option("--output-len", help="New tokens per request (EOS ignored): N, A:B drawn uniformly per request, or @FILE: drawn from a dataset's output_tokens / ShareGPT reply lengths.")] = "32",
    export: Annotated[Path | None, typer.Option("--export", help="Every online request's timings and token counts, one row each (.jsonl or .csv).")] = None,
    prefix_len: Annotated[int, typer.Option("--prefix-len", min=0, help="Shared-prefix workload: tokens of system prompt each request starts with.")] = 0,
    prefix_count: Annotated[int, typer.Option("--prefix-count", min=1, help="With --prefix-len: distinct shared prefixes, round robin.")] = 1,
    dataset: Annotated[Path | None, typer.Option("--dataset", "--data", "--dataset-path", help="JSONL/JSON rows with prompt, messages (OpenAI chat) or conversations (ShareGPT), optional output_tokens: sent instead of synthetic prompts. Or GuideLLM's synthetic spec: prompt_tokens=N,output_tokens=M[,*_min=,*_max=,prefix_tokens=] (overrides --prompt-len/--output-len/--prefix-len).")] = None,
    concurrency: Annotated[str | None, typer.Option("--concurrency", "--max-concurrency", help="Requests in flight at most (online); C1,C2,... runs one level each; with --rate: the cap.")] = None,
    rate: Annotated[str | None, typer.Option("--rate", "--request-rate", help="Requests/s (online): R, R1,R2,... (one level each), inf (all at once), or sweep[:N]: synchronous, throughput, then N-2 constant rates between (GuideLLM's sweep, N=10).")] = None,
    rate_type: Annotated[str | None, typer.Option("--rate-type", help=f"How --rate is read: {', '.join(RATE_TYPES)} (GuideLLM's names; default poisson arrivals).")] = None,
    warmup: Annotated[str | None, typer.Option("--warmup", help="Requests at the start of each level sent but left out of its statistics: N, or a fraction (0.1).")] = None,
    cooldown: Annotated[str | None, typer.Option("--cooldown", help="Likewise at the end of each level.")] = None,
    max_seconds: Annotated[float | None, typer.Option("--max-seconds", min=0.1, help="Per level: no request starts after this many seconds (those in flight finish).")] = None,
    duration: Annotated[float | None, typer.Option("--duration", min=0.1, help="With --rate R: send R x duration requests.")] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed repeats of each speed figure, source and artifact interleaved (ABBA), after an untimed warm-up: medians with 95% intervals; 1: no interval, no verdict.")] = DEFAULT_REPEATS,
    kpi: Annotated[Path | None, typer.Option("--kpi", help="KPI gates (YAML); a failure exits 3.")] = None,
    gpu_hour_cost: Annotated[float | None, typer.Option("--gpu-hour-cost", help="USD per hour of the machine, for cost per 1K tokens.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Directory for report.json/.md/.html.")] = None,
    endpoint: Annotated[str | None, typer.Option("--endpoint", "--target", "--base-url", help="Load-test an OpenAI-compatible server instead (base URL, with or without /v1).")] = None,
    prompt_format: Annotated[str | None, typer.Option("--prompt-format", help="tokens or text: how prompts are sent (default: text to an --endpoint, token ids in process).")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help="With --endpoint: sent as a bearer token (default: $OPENAI_API_KEY, as the openai SDK reads it).", show_default=False)] = None,
    request_timeout: Annotated[float | None, typer.Option("--request-timeout", help=f"With --endpoint: seconds to wait for the server's next byte (its response, or the next streamed chunk) before a request fails; a server that answers none within it ends the run (default {REQUEST_TIMEOUT_S:g}, the openai SDK's).")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", "--processor", help="With --endpoint: the tokenizer (MODEL spec) that sizes text prompts (default: MODEL if local, else the builtin one).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="builtin (in process), or vllm: each model served by `vllm serve` for the run and measured as an endpoint.")] = "builtin",
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", min=1, help="--engine vllm: GPUs per model (tensor parallel).")] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option("--pipeline-parallel-size", min=1, help="--engine vllm: pipeline stages.")] = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_num_seqs: MaxNumSeqsOpt = ENGINE.max_num_seqs,
    max_model_len: MaxModelLenOpt = None,
    enforce_eager: EnforceEagerOpt = False,
    gpu_memory_utilization: GpuMemoryOpt = ENGINE.gpu_memory_utilization,
    lm_head: LmHeadOpt = ENGINE.lm_head,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Measure accuracy, throughput, latency under load and cost; gate on KPIs."""
    from optcli.bench.profile import profile as run_profile  # torch, transformers: only when profiling

    report, gate_failure = None, None
    with guard(as_json):
        levels, sweep_size, arrivals = plan_levels(rate, rate_type, concurrency, requests)
        if duration is not None:
            rates = [lv.rate for lv in levels if lv.rate is not None]
            if not rates or sweep_size:
                raise UsageError("--duration needs --rate R (requests = R x duration)")
            requests = max(1, round(max(rates) * duration))
        synthetic = None  # GuideLLM's synthetic --data: its lengths replace --prompt-len / --output-len
        if dataset is not None and not dataset.exists() and "=" in str(dataset):
            synthetic = parse_synthetic_data(str(dataset))
            prefix_len, dataset = synthetic["prefix_len"] or prefix_len, None
        if prompt_format not in (None, "tokens", "text"):
            raise UsageError(f"--prompt-format must be tokens or text (got '{prompt_format}')")
        if prefix_len and dataset is not None:
            raise UsageError("--prefix-len shapes synthetic prompts: not with --dataset (put the shared prefix in its rows)")
        warm, cool = parse_exclusion(warmup, "--warmup"), parse_exclusion(cooldown, "--cooldown")
        if (warm >= 1 and cool >= 1 and warm + cool >= requests) or (warm < 1 and cool < 1 and warm + cool >= 1):
            raise UsageError(f"--warmup {warmup} and --cooldown {cooldown} leave none of the {requests} requests measured")
        rows = load_dataset(dataset) if dataset is not None else ()
        workload = Workload(requests=requests,
                            prompt_len=synthetic["prompt_len"] if synthetic else parse_prompt_len(prompt_len),
                            output_len=synthetic["output_len"] if synthetic else parse_output_len(output_len),
                            dataset=rows, prefix_len=prefix_len, prefix_count=prefix_count,
                            levels=levels, sweep_size=sweep_size, arrivals=arrivals, seed=seed,
                            warmup=warm, cooldown=cool,
                            max_seconds=max_seconds, prompt_format=prompt_format, repeats=repeats)
        if engine != "vllm" and (tensor_parallel_size > 1 or pipeline_parallel_size > 1):
            raise UsageError("the builtin engine runs on one device; --tensor/--pipeline-parallel-size need --engine vllm")
        config = engine_config(device, dtype, max_num_seqs, max_model_len, enforce_eager, gpu_memory_utilization, lm_head)
        if api_key is not None and not api_key.strip():
            raise UsageError("--api-key is empty (leave it out to send none)")
        if endpoint and api_key is None:
            api_key = os.environ.get("OPENAI_API_KEY", "").strip() or None
        if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
            raise UsageError("--api-key (or OPENAI_API_KEY) holds characters an HTTP header cannot carry")
        note = _Steps(not as_json and err.is_terminal)
        try:
            report = run_profile(model, baseline, eval_text, workload, kpi, gpu_hour_cost, out_dir, endpoint, config,
                                 note, tokenizer=tokenizer, accuracy_backend=accuracy_backend,
                                 baseline_endpoint=baseline_endpoint,
                                 tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
                                 tasks_path=tasks_path, limit=limit, num_fewshot=num_fewshot, dataset_path=dataset,
                                 export=export, engine=engine,
                                 vllm=VllmOptions(tensor_parallel_size, pipeline_parallel_size, max_model_len),
                                 api_key=api_key, request_timeout=request_timeout)
        except KpiFailed as exc:  # the report is complete and written: show it, then exit 3
            report, gate_failure = exc.report, exc
        finally:
            note.close()
    _show_profile(report, as_json, out_dir)
    if gate_failure is not None:
        fail(str(gate_failure), 3)


class _Steps:
    """What a person at a terminal sees while profile works: a dim line per step and, while requests are out to
    a server, one live line under it (answered, in flight, the longest wait against the timeout), redrawn from
    the load's own event loop twice a second (no refresh thread to compete with its time stamps). Nothing in
    pipes or with --json."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self._live = None

    def __call__(self, message: str) -> None:
        self.close()
        if self.show:
            err.print(f"[dim]· {message}[/dim]")

    def load(self, state: dict) -> None:
        if not self.show:
            return
        if self._live is None:
            from rich.live import Live

            self._live = Live(console=err, auto_refresh=False, transient=True)
            self._live.start()
        line = f"  {state['done']}/{state['total']} answered, {state['in_flight']} in flight"
        if state["failed"]:
            line += f", {state['failed']} failed"
        if state["oldest_s"] is not None and state["oldest_s"] >= 2:
            line += f"; waiting {state['oldest_s']:.0f} s (request timeout {state['timeout_s']:g} s)"
        self._live.update(Text(line, style="dim"), refresh=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _show_profile(report: dict, as_json: bool, out_dir: Path | None) -> None:
    if as_json:
        emit_json(report)
        return

    def fmt(value, spec=".3g") -> str:
        return "n/a" if value is None else format(value, spec)

    table = Table(title=f"optcli profile · {report['model']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    tp, acc, mem = report["throughput"], report["accuracy"], report["memory"]
    engine = report["workload"].get("engine") or {}
    if engine:
        dtype = engine["dtype"] + (f" (baseline {engine['baseline_dtype']})" if engine.get("baseline_dtype") not in
                                   (None, engine["dtype"]) else "")
        table.add_row("device / dtype", f"{engine['device']} / {dtype}")
    table.add_row("output tok/s (offline)", fmt(tp["output_tok_s"], ".1f"))
    table.add_row("requests/s", fmt(tp["requests_s"], ".2f"))
    for metric in ("ttft", "tpot", "itl", "e2e"):
        lat = report["latency_ms"][metric]
        table.add_row(f"{metric} p50 / p99 (ms)", f"{fmt(lat['p50'], '.1f')} / {fmt(lat['p99'], '.1f')}")
    table.add_row("ppl (baseline)", f"{fmt(acc['ppl'], '.3f')} ({fmt(acc['baseline_ppl'], '.3f')})")
    table.add_row("KLD mean / top-1", f"{fmt(acc['kld_mean'], '.4f')} / {fmt(acc['top1_agreement'], '.3f')}")
    for row in acc.get("tasks") or []:
        table.add_row(f"{row['task']} {row['metric']} (baseline, recovery)",
                      f"{fmt(row['candidate'], '.4f')} ({fmt(row['baseline'], '.4f')}, {fmt(row['recovery'], '.3f')})")
    table.add_row("weights / peak / KV cache", " / ".join(mib(mem[k]) for k in ("weights_bytes", "peak_bytes", "kv_cache_bytes")))
    table.add_row("batch efficiency", fmt(report["batch_efficiency"], ".2f"))
    if tp.get("prefix_cache_hit_rate") is not None:
        table.add_row("prefix cache hit rate (online)", fmt(tp["prefix_cache_hit_rate"], ".3f"))
    table.add_row("USD per 1K tokens (prompt + generated)", fmt(report["cost"]["usd_per_1k_tokens"], ".5f"))
    table.add_row("USD per 1K output tokens", fmt(report["cost"].get("usd_per_1k_output_tokens"), ".5f"))
    out.print(table)
    comparison = comparison_table(report)  # the source measured the same way in this run: ratios are the point
    if comparison is not None:
        title, headers, rows = comparison
        side = Table(title="source vs artifact", caption=comparison_caption(report))
        for i, header in enumerate(headers):
            side.add_column(header, justify="left" if i == 0 else "right")
        for row in rows:
            side.add_row(*(escape(cell) for cell in row))
        out.print(side)
    busy = contention_warning(report)
    if busy:  # first: every figure above was taken on a busy machine
        err.print(f"[yellow]warning: {escape(busy)}[/yellow]", highlight=False, soft_wrap=True)
    for warning in comparison_warnings(report):
        err.print(f"[yellow]warning: {escape(warning)}[/yellow]", highlight=False, soft_wrap=True)
    for note in throughput_notes(report):
        err.print(f"[yellow]note: {escape(note)}[/yellow]", highlight=False, soft_wrap=True)
    for line in (roofline_line(report), head_line(report)):
        if line is not None:
            out.print(escape(line), highlight=False, soft_wrap=True)
    failures = tp.get("failures") or {}
    if failures.get("failed"):
        why = "; ".join(f"{r['count']}x {r['error']}" for r in failures["reasons"][:3])
        err.print(f"[yellow]{failures['failed']} of {failures['total']} requests failed:[/yellow] {why}", highlight=False)
    for check in report["kpi"]["checks"]:
        style = "green" if check["passed"] else "red"
        base = "" if check.get("baseline") is None else f", baseline {fmt(check['baseline'])}"
        value = kpi_value(check) if check.get("ci_low") is not None else fmt(check["value"])
        out.print(f"[{style}]{'PASS' if check['passed'] else 'FAIL'}[/{style}] {escape(check['name'])} (value {escape(value)}{base})")
    for item in report["kpi"].get("production_only") or []:
        out.print(f"KPI {escape(item['key'])}: recorded, not applied (production-only: {escape(item['why'])})",
                  highlight=False, soft_wrap=True)
    if out_dir is not None:
        out.print(f"reports: {out_dir}/report.json, report.md, report.html")
