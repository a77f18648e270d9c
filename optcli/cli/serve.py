"""`optcli serve`: the built-in engine behind the OpenAI-compatible app, or a hand-off to vLLM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    engine_config,
    guard,
)
from optcli.errors import UsageError


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Model or artifact to serve.")],
    host: Annotated[str, typer.Option("--host", help="Interface to bind (loopback unless you say otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", help="Require `Authorization: Bearer KEY` (all but /health).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="builtin or vllm.")] = "builtin",
    max_num_seqs: MaxNumSeqsOpt = ENGINE.max_num_seqs,
    max_model_len: MaxModelLenOpt = None,
    max_waiting: Annotated[int, typer.Option("--max-waiting", min=0, help="Queued requests beyond which new ones get 429.")] = 256,
    served_model_name: Annotated[str | None, typer.Option("--served-model-name", help="Name clients use (default: MODEL).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    enforce_eager: EnforceEagerOpt = False,
    gpu_memory_utilization: GpuMemoryOpt = ENGINE.gpu_memory_utilization,
    lm_head: LmHeadOpt = ENGINE.lm_head,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", min=1, help="vLLM only.")] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option("--pipeline-parallel-size", min=1, help="vLLM only.")] = 1,
    kpi: Annotated[Path | None, typer.Option("--kpi", help="KPI file (YAML) to watch live: gauges on /metrics, GET /kpi, a log line on breach and recovery.")] = None,
    baseline_report: Annotated[Path | None, typer.Option("--baseline-report", help="With --kpi: profile report.json whose throughput degradation_threshold compares with.")] = None,
    gpu_hour_cost: Annotated[float | None, typer.Option("--gpu-hour-cost", help="With --kpi: USD per GPU hour (cost gates, budget burn).")] = None,
    monthly_budget: Annotated[float | None, typer.Option("--monthly-budget", help="With --kpi: USD per month that cost.budget_alert is a share of.")] = None,
    eval_text: Annotated[Path | None, typer.Option("--eval-text", help="With --kpi: text the accuracy probe scores (default: the builtin corpus's held-out text).")] = None,
) -> None:
    """Serve MODEL behind an OpenAI-compatible HTTP API."""
    from optcli.checkpoints.resolve import resolve_model

    name = served_model_name or model
    with guard(False):
        if engine not in ("builtin", "vllm"):
            raise UsageError(f"--engine must be builtin or vllm (got '{engine}')")
        if api_key is not None and not api_key.strip():
            raise UsageError("--api-key is empty: give a key, or leave the option out to serve without one")
        from optcli.cli.serve_kpi import kpi_options

        kpi_watch = kpi_options(kpi, baseline_report, gpu_hour_cost, monthly_budget, eval_text, engine)
        config = engine_config(device, dtype, max_num_seqs, max_model_len, enforce_eager, gpu_memory_utilization, lm_head)
        from optcli.serve.server import bind_listener

        sock = bind_listener(host, port)  # before anything loads: a port in use is exit 2 at once
        path = str(resolve_model(model).path)
        if engine == "vllm":
            sock.close()  # vLLM binds it itself
            from optcli.serve.vllm import exec_vllm, vllm_command

            if lm_head != "dense":
                raise UsageError("--lm-head int8 is a builtin-engine option; vLLM serves the checkpoint's head")
            exec_vllm(vllm_command(path, host, port, name, api_key, max_num_seqs, max_model_len,
                                   gpu_memory_utilization, tensor_parallel_size, pipeline_parallel_size, enforce_eager,
                                   dtype=dtype))
        if tensor_parallel_size > 1 or pipeline_parallel_size > 1:
            raise UsageError("the builtin engine runs on one device; use --engine vllm for parallel serving")
        from optcli.serve.server import run_server

        run_server(path, name, host, port, api_key, config, max_waiting, sock=sock, kpi=kpi_watch)
