"""The `optcli` command line: one thin Typer function per subcommand; the work lives in the library.

Exit codes: 0 ok · 1 runtime failure · 2 bad input or usage · 3 a KPI gate failed. With --json,
stdout carries exactly one JSON object; progress and logs go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from optcli import __version__
from optcli.config import LM_HEADS, EngineConfig, check_dtype
from optcli.errors import KpiFailed, UsageError

app = typer.Typer(
    help="Quantize, profile, serve and cost LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipes_app = typer.Typer(help="List and show quantization recipes.", no_args_is_help=True)
convert_app = typer.Typer(help="Convert foreign checkpoints to Hugging Face directories.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(convert_app, name="convert")

out = Console()
err = Console(stderr=True)

# Engine options shared by `serve` and `profile`, so what profile measures is what serve runs.
_ENGINE = EngineConfig()
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (CUDA: the checkpoint's, bf16 for fp32; CPU: bf16 where "
                                       "it is native and measured faster, else fp32), bfloat16, float16 or float32.")]
MaxNumSeqsOpt = Annotated[int, typer.Option("--max-num-seqs", min=1, help="Sequences in one batch at most.")]
MaxModelLenOpt = Annotated[int | None, typer.Option("--max-model-len", min=2, help=f"Context per sequence (default {_ENGINE.max_model_len}, capped at the model's).")]
EnforceEagerOpt = Annotated[bool, typer.Option("--enforce-eager", help="No CUDA graphs.")]
GpuMemoryOpt = Annotated[float, typer.Option("--gpu-memory-utilization", min=0.05, max=1.0, help="Share of the GPU the engine may use.")]
LmHeadOpt = Annotated[str, typer.Option("--lm-head", help="dense | int8: round the LM head (and a tied embedding) to int8 per row at load.")]


def _engine_config(device: str, dtype: str, max_num_seqs: int, max_model_len: int | None, enforce_eager: bool,
                   gpu_memory_utilization: float, lm_head: str = "dense") -> EngineConfig:
    check_dtype(dtype, "--dtype")
    if lm_head not in LM_HEADS:
        raise UsageError(f"--lm-head must be one of {', '.join(LM_HEADS)} (got '{lm_head}')")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda (got '{device}')")
    return EngineConfig(device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                        max_model_len=max_model_len or _ENGINE.max_model_len, enforce_eager=enforce_eager,
                        gpu_memory_utilization=gpu_memory_utilization, lm_head=lm_head)


def _fail(message: str, code: int) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _run(as_json: bool):
    """Map library errors to exit codes; in --json mode keep stdout for the one JSON object."""
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            yield
    except UsageError as exc:
        _fail(str(exc), 2)
    except KpiFailed as exc:
        _fail(str(exc), 3)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for users; OPTCLI_DEBUG=1 for the traceback
        if os.environ.get("OPTCLI_DEBUG"):
            raise
        _fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (set OPTCLI_DEBUG=1 for details)", 1)


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        out.print(f"optcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the libraries' own logs and progress bars.")] = False,
) -> None:
    """optcli: make LLMs cheaper and faster to serve."""
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Silence the libraries' log lines and tqdm bars: we show our own progress (stderr, terminals only)."""
    import warnings

    for key, value in {
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "LLM_COMPRESSOR_LOG_LEVEL": "ERROR",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    for name in ("torch.fx", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Some libraries pass disable=False explicitly, which TQDM_DISABLE cannot override.
    import tqdm

    original_init = tqdm.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original_init(self, *args, **kwargs)

    tqdm.tqdm.__init__ = quiet_init


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="HF directory, hub id, or builtin:tiny-llama.")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe name (optcli recipes list) or YAML path.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to create.")],
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Calibration set (optcli calibrate).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model's own code.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for calibration sampling.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Quantize MODEL with a recipe into an artifact directory."""
    if device == "cpu":  # llm-compressor onloads to any visible accelerator; hide them before torch loads
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from optcli.quantize import quantize as run_quantize

    with _run(as_json), _layer_progress(f"quantizing {model} · {recipe}", as_json) as progress:
        manifest = run_quantize(model, recipe, out_dir, calibration, device, force, trust_remote_code, seed, progress)
    summary = {
        "artifact": manifest["artifact"],
        "recipe": manifest["recipe"]["name"],
        "source": manifest["source"]["spec"],
        "device": manifest["device"],
        "duration_s": manifest["duration_s"],
        "size_bytes_before": manifest["size_bytes"]["before"],
        "size_bytes_after": manifest["size_bytes"]["after"],
        "peak_memory": manifest["memory"],
        "layers": _count_decisions(manifest["layers"]),
    }
    if as_json:
        _emit_json(summary)
        return
    table = Table(title=f"optcli quantize · {summary['recipe']}", show_header=False)
    table.add_row("artifact", summary["artifact"])
    table.add_row("source", summary["source"])
    before, after = summary["size_bytes_before"], summary["size_bytes_after"]
    table.add_row("weights", f"{_mib(before)} → {_mib(after)} ({after / before:.0%})" if before else _mib(after))
    table.add_row("duration", f"{summary['duration_s']:.1f} s on {summary['device']}")
    table.add_row("peak host memory", _mib(summary["peak_memory"]["host_peak_rss_bytes"]))
    for decision, count in summary["layers"].items():
        table.add_row(f"layers: {decision}", str(count))
    out.print(table)


def _count_decisions(layers: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in layers.values():
        key = str(layer.get("scheme", "?")).split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


@contextlib.contextmanager
def _layer_progress(description: str, as_json: bool):
    """A per-layer progress bar for people on a terminal; nothing in pipes or --json mode."""
    if as_json or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{description} · layer {done}/{total}")

        yield advance


@app.command()
def profile(
    model: Annotated[str, typer.Argument(help="Model or artifact to profile (or the served model name with --endpoint).")],
    baseline: Annotated[str | None, typer.Option("--baseline", help="Reference model for accuracy (default: the artifact's source).")] = None,
    eval_text: Annotated[Path | None, typer.Option("--eval-text", help="Text for accuracy (default: the builtin corpus's heldout.txt).")] = None,
    requests: Annotated[int, typer.Option("--requests", min=1, help="Synthetic requests per phase.")] = 32,
    prompt_len: Annotated[str, typer.Option("--prompt-len", help="Prompt lengths, uniform in [A, B).")] = "16:64",
    output_len: Annotated[int, typer.Option("--output-len", min=1, help="New tokens per request (EOS ignored).")] = 32,
    concurrency: Annotated[str | None, typer.Option("--concurrency", help="Requests in flight at most (online); C1,C2,... sweeps.")] = None,
    rate: Annotated[float | None, typer.Option("--rate", min=0.001, help="Poisson arrival rate, requests/s (online).")] = None,
    duration: Annotated[float | None, typer.Option("--duration", min=0.1, help="With --rate: send rate x duration requests.")] = None,
    kpi: Annotated[Path | None, typer.Option("--kpi", help="KPI gates (YAML); a failure exits 3.")] = None,
    gpu_hour_cost: Annotated[float | None, typer.Option("--gpu-hour-cost", help="USD per hour of the machine, for cost per 1K tokens.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Directory for report.json/.md/.html.")] = None,
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="Load-test an OpenAI-compatible server instead (base URL, with or without /v1).")] = None,
    prompt_format: Annotated[str | None, typer.Option("--prompt-format", help="tokens or text: how prompts are sent (default: text to an --endpoint, token ids in process).")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="With --endpoint: the tokenizer (MODEL spec) that sizes text prompts (default: MODEL if local, else the builtin one).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_num_seqs: MaxNumSeqsOpt = _ENGINE.max_num_seqs,
    max_model_len: MaxModelLenOpt = None,
    enforce_eager: EnforceEagerOpt = False,
    gpu_memory_utilization: GpuMemoryOpt = _ENGINE.gpu_memory_utilization,
    lm_head: LmHeadOpt = _ENGINE.lm_head,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Measure accuracy, throughput, latency under load and cost; gate on KPIs."""
    from optcli.profile import Workload, parse_concurrency, parse_prompt_len
    from optcli.profile import profile as run_profile

    report, gate_failure = None, None
    with _run(as_json):
        if duration is not None:
            if rate is None:
                raise UsageError("--duration needs --rate (requests = rate x duration)")
            requests = max(1, round(rate * duration))
        level, sweep = parse_concurrency(concurrency)
        if prompt_format not in (None, "tokens", "text"):
            raise UsageError(f"--prompt-format must be tokens or text (got '{prompt_format}')")
        workload = Workload(requests=requests, prompt_len=parse_prompt_len(prompt_len), output_len=output_len,
                            concurrency=level, sweep=sweep, rate=rate, seed=seed, prompt_format=prompt_format)
        config = _engine_config(device, dtype, max_num_seqs, max_model_len, enforce_eager, gpu_memory_utilization, lm_head)

        def note(message: str) -> None:
            if not as_json and err.is_terminal:
                err.print(f"[dim]· {message}[/dim]")

        try:
            report = run_profile(model, baseline, eval_text, workload, kpi, gpu_hour_cost, out_dir, endpoint, config,
                                 note, tokenizer=tokenizer)
        except KpiFailed as exc:  # the report is complete and written: show it, then exit 3
            report, gate_failure = exc.report, exc
    _show_profile(report, as_json, out_dir)
    if gate_failure is not None:
        _fail(str(gate_failure), 3)


def _show_profile(report: dict, as_json: bool, out_dir: Path | None) -> None:
    if as_json:
        _emit_json(report)
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
    table.add_row("weights / peak / KV cache", " / ".join(_mib(mem[k]) for k in ("weights_bytes", "peak_bytes", "kv_cache_bytes")))
    table.add_row("batch efficiency", fmt(report["batch_efficiency"], ".2f"))
    table.add_row("USD per 1K tokens (prompt + generated)", fmt(report["cost"]["usd_per_1k_tokens"], ".5f"))
    table.add_row("USD per 1K output tokens", fmt(report["cost"].get("usd_per_1k_output_tokens"), ".5f"))
    out.print(table)
    from rich.markup import escape

    from optcli.report.markdown import comparison_table, comparison_warnings, head_line, roofline_line

    comparison = comparison_table(report)  # the source measured the same way in this run: ratios are the point
    if comparison is not None:
        title, headers, rows = comparison
        side = Table(title="source vs artifact")
        for i, header in enumerate(headers):
            side.add_column(header, justify="left" if i == 0 else "right")
        for row in rows:
            side.add_row(*row)
        out.print(side)
    for warning in comparison_warnings(report):
        err.print(f"[yellow]warning: {escape(warning)}[/yellow]", highlight=False, soft_wrap=True)
    for line in (roofline_line(report), head_line(report)):
        if line is not None:
            out.print(escape(line), highlight=False, soft_wrap=True)
    failures = tp.get("failures") or {}
    if failures.get("failed"):
        why = "; ".join(f"{r['count']}x {r['error']}" for r in failures["reasons"][:3])
        err.print(f"[yellow]{failures['failed']} of {failures['total']} requests failed:[/yellow] {why}", highlight=False)
    for check in report["kpi"]["checks"]:
        style = "green" if check["passed"] else "red"
        out.print(f"[{style}]{'PASS' if check['passed'] else 'FAIL'}[/{style}] {check['name']} (value {fmt(check['value'])})")
    if out_dir is not None:
        out.print(f"reports: {out_dir}/report.json, report.md, report.html")


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Model or artifact to serve.")],
    host: Annotated[str, typer.Option("--host", help="Interface to bind (loopback unless you say otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", help="Require `Authorization: Bearer KEY` (all but /health).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="builtin or vllm.")] = "builtin",
    max_num_seqs: MaxNumSeqsOpt = _ENGINE.max_num_seqs,
    max_model_len: MaxModelLenOpt = None,
    max_waiting: Annotated[int, typer.Option("--max-waiting", min=0, help="Queued requests beyond which new ones get 429.")] = 256,
    served_model_name: Annotated[str | None, typer.Option("--served-model-name", help="Name clients use (default: MODEL).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    enforce_eager: EnforceEagerOpt = False,
    gpu_memory_utilization: GpuMemoryOpt = _ENGINE.gpu_memory_utilization,
    lm_head: LmHeadOpt = _ENGINE.lm_head,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", min=1, help="vLLM only.")] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option("--pipeline-parallel-size", min=1, help="vLLM only.")] = 1,
) -> None:
    """Serve MODEL behind an OpenAI-compatible HTTP API."""
    from optcli.models import resolve_model

    name = served_model_name or model
    with _run(False):
        if engine not in ("builtin", "vllm"):
            raise UsageError(f"--engine must be builtin or vllm (got '{engine}')")
        config = _engine_config(device, dtype, max_num_seqs, max_model_len, enforce_eager, gpu_memory_utilization, lm_head)
        path = str(resolve_model(model).path)
        if engine == "vllm":
            from optcli.serve.vllm import exec_vllm, vllm_command

            if lm_head != "dense":
                raise UsageError("--lm-head int8 is a builtin-engine option; vLLM serves the checkpoint's head")
            exec_vllm(vllm_command(path, host, port, name, api_key, max_num_seqs, max_model_len,
                                   gpu_memory_utilization, tensor_parallel_size, pipeline_parallel_size, enforce_eager,
                                   dtype=dtype))
        if tensor_parallel_size > 1 or pipeline_parallel_size > 1:
            raise UsageError("the builtin engine runs on one device; use --engine vllm for parallel serving")
        from optcli.serve.server import run_server

        run_server(path, name, host, port, api_key, config, max_waiting)


@app.command()
def roi(
    report: Annotated[Path | None, typer.Option("--report", help="report.json from optcli profile (measured).")] = None,
    estimate: Annotated[str | None, typer.Option("--estimate", help="MODEL (or config.json): roofline estimate instead of a report.")] = None,
    baseline_report: Annotated[Path | None, typer.Option("--baseline-report", help="report.json of what you run today.")] = None,
    baseline_usd_per_1k_tokens: Annotated[float | None, typer.Option("--baseline-usd-per-1k-tokens", help="Or today's API price per 1K tokens.")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU from the catalog (price, memory, bandwidth, FLOP/s).")] = None,
    gpu_hour_cost: Annotated[float | None, typer.Option("--gpu-hour-cost", help="USD per GPU hour (overrides report and catalog).")] = None,
    gpu_catalog: Annotated[Path | None, typer.Option("--gpu-catalog", help="YAML merged over the packaged GPU catalog.")] = None,
    requests_per_day: Annotated[float | None, typer.Option("--requests-per-day", help="Default 10,000.")] = None,
    tokens_per_request: Annotated[float | None, typer.Option("--tokens-per-request", help="Prompt + generated (default: the report's workload, else 1,000).")] = None,
    implementation_cost: Annotated[float | None, typer.Option("--implementation-cost", help="One-off USD, for the payback period (default 0).")] = None,
    target_rps: Annotated[float | None, typer.Option("--target-rps", help="Requests/s to plan replicas for.")] = None,
    p95_slo_ms: Annotated[float | None, typer.Option("--p95-slo-ms", help="p95 end-to-end latency SLO.")] = None,
    load_trace: Annotated[Path | None, typer.Option("--load-trace", help="CSV time,requests_per_s: replay autoscaling.")] = None,
    min_replicas: Annotated[int, typer.Option("--min-replicas")] = 1,
    max_replicas: Annotated[int, typer.Option("--max-replicas")] = 10,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG of replicas and load over the trace.")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Recipe for the memory plan/estimate (default: the report's, else bf16).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Concurrent sequences (estimate default 16).")] = None,
    context_len: Annotated[int | None, typer.Option("--context-len", help="Tokens per sequence for the memory plan (default 2048).")] = None,
    output_len: Annotated[int | None, typer.Option("--output-len", help="Generated tokens per request for --estimate (default 256).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="The dtype `serve --dtype` would get, for the KV cache in the plan (default: the report's, else auto).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Cost per 1K tokens, savings, payback, replicas and autoscaling from a profile report or an estimate."""
    from optcli.roi import RoiOptions, compute_roi

    options = RoiOptions(report, baseline_report, baseline_usd_per_1k_tokens, gpu, gpu_hour_cost, gpu_catalog,
                         requests_per_day, tokens_per_request, implementation_cost, target_rps, p95_slo_ms,
                         load_trace, min_replicas, max_replicas, estimate, recipe, batch_size, context_len, output_len,
                         dtype=dtype)
    with _run(as_json):
        if plot is not None and load_trace is None:
            raise UsageError("--plot needs --load-trace")
        result = compute_roi(options)
        if plot is not None:
            from optcli.capacity import plot as plot_replay

            plot_replay(result["capacity"]["autoscaling"]["rows"], plot)
    if as_json:
        _emit_json(result)
        return
    from optcli.roi_render import render_roi

    render_roi(result, out, plot)


@recipes_app.command("list")
def recipes_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the built-in recipes."""
    from optcli.recipes import list_recipes

    with _run(as_json):
        recipes = list_recipes()
    if as_json:
        _emit_json({"recipes": [{"name": r.name, "backend": r.backend, "scheme": r.scheme, "description": r.description} for r in recipes]})
        return
    table = Table(title="optcli recipes")
    for col in ("name", "backend", "scheme", "calibration", "description"):
        table.add_column(col, overflow="fold")
    for r in recipes:
        calib = f"{r.calibration.samples}×{r.calibration.seq_len}" if r.needs_calibration() else "none"
        table.add_row(r.name, r.backend, r.scheme, calib, r.description)
    out.print(table)


@recipes_app.command("show")
def recipes_show(
    name: Annotated[str, typer.Argument(help="Recipe name or YAML path.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one recipe, validated."""
    import yaml

    from optcli.recipes import load_recipe

    with _run(as_json):
        recipe = load_recipe(name)
    data = recipe.model_dump()
    if as_json:
        _emit_json(data)
    else:
        out.print(yaml.safe_dump(data, sort_keys=False), highlight=False)


@convert_app.command("llama2c")
def convert_llama2c_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="llama2.c checkpoint (.bin, format v0).")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="llama2.c tokenizer (.bin).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="HF directory to create.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Convert a llama2.c checkpoint and tokenizer into a Hugging Face directory."""
    from optcli.llama2c import convert_llama2c

    with _run(as_json):
        path = convert_llama2c(checkpoint, tokenizer, out_dir)
    if as_json:
        _emit_json({"out": str(path)})
    else:
        out.print(f"wrote {path}")


@app.command()
def calibrate(
    model: Annotated[str, typer.Option("--model", help="Model whose tokenizer the set is built with.")],
    source: Annotated[str, typer.Option("--source", help="A .txt/.jsonl/.json/.parquet/.csv file, a directory, "
                                        "a save_to_disk directory, hf:NAME[:CONFIG][:SPLIT], builtin, or self.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Calibration set directory to create.")],
    samples: Annotated[int, typer.Option("--samples", min=1, help="Windows to pick.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="Tokens per window.")] = 512,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    text_field: Annotated[str | None, typer.Option("--text-field", help="Row field holding the text (default: text).")] = None,
    chat_template: Annotated[bool, typer.Option("--chat-template", help="Render OpenAI-style 'messages' rows with the model's chat template.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 2 when the source has fewer windows than --samples.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Activation-outlier report per linear layer (stats.json) and a recipe suggestion.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as one JSON object.")] = False,
) -> None:
    """Build a reusable, hashed calibration set; with --stats, report activation outliers."""
    from optcli.calibration import calibrate as run_calibrate

    with _run(as_json):
        calib, report = run_calibrate(model, source, out_dir, samples, seq_len, seed, text_field=text_field,
                                      chat_template=chat_template, strict=strict, stats=stats, force=force)
    manifest = calib.manifest
    for warning in manifest["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    if as_json:
        result = {"out": str(out_dir), **manifest}
        if report is not None:
            result["stats"] = {"file": str(out_dir / "stats.json"), "suggestion": report["suggestion"],
                               "worst": [{"layer": n, **report["layers"][n]} for n in report["worst"][:5]]}
        _emit_json(result)
        return
    _show_calibration(manifest, out_dir)
    if report is not None:
        _show_outliers(report, out_dir)


def _show_calibration(manifest: dict, out_dir: Path) -> None:
    table = Table(title="optcli calibrate", show_header=False)
    table.add_row("source", manifest["source"])
    dropped = manifest["documents_dropped"]
    reasons = ", ".join(f"{n} {r}" for r, n in dropped.items())
    table.add_row("documents", f"{manifest['documents_read']} read · {manifest['documents_used']} used · "
                  f"{sum(dropped.values())} dropped" + (f" ({reasons})" if reasons else ""))
    ts = manifest["token_stats"]
    table.add_row("document tokens", f"min {ts['min']} · median {ts['median']} · mean {ts['mean']} · max {ts['max']} "
                  f"· total {ts['total']}")
    peak = max(b["count"] for b in ts["histogram"]) or 1
    for b in ts["histogram"]:
        if b["count"]:
            table.add_row(f"  {b['min']}–{b['max']} tokens", f"{'█' * max(1, round(24 * b['count'] / peak))} {b['count']}")
    table.add_row("samples", f"{manifest['samples']} × {manifest['seq_len']} tokens (asked {manifest['samples_requested']}, "
                  f"seed {manifest['seed']})")
    table.add_row("sha256", manifest["sha256"])
    table.add_row("written", str(out_dir))
    out.print(table)


def _show_outliers(report: dict, out_dir: Path, rows: int = 10) -> None:
    table = Table(title=f"activation outliers · worst {min(rows, len(report['worst']))} of {len(report['layers'])} "
                  f"linear layers ({report['tokens']} tokens)")
    table.add_column("layer", no_wrap=True)
    for col in ("input absmax", "median channel", "outlier ratio", "weight range"):
        table.add_column(col, justify="right")
    for name in report["worst"][:rows]:
        s = report["layers"][name]
        ratio = "n/a" if s["outlier_ratio"] is None else f"{s['outlier_ratio']:.1f}×"
        table.add_row(name, f"{s['input_absmax']:.3g}", f"{s['input_channel_median']:.3g}", ratio,
                      f"{s['weight_min']:.3g}..{s['weight_max']:.3g}")
    out.print(table)
    suggestion = report["suggestion"]
    alt = f" (or {', '.join(suggestion['alternatives'])})" if suggestion["alternatives"] else ""
    out.print(f"suggested recipe: [bold]{suggestion['recipe']}[/bold]{alt} — {suggestion['reason']}", soft_wrap=True)
    out.print(f"all layers: {out_dir / 'stats.json'}")


def run() -> None:
    app()


if __name__ == "__main__":
    run()
