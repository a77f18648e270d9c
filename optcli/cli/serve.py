"""`optcli serve`: the built-in engine behind the OpenAI-compatible app, or a hand-off to vLLM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from optcli.cli.app import app
from optcli.cli.common import guard
from optcli.cli.flags import with_options
from optcli.config import EngineConfig, option
from optcli.errors import UsageError


@dataclass(frozen=True)
class KpiWatch:
    """`serve --kpi FILE` and what its gates need (`cli/serve_kpi.py` checks them before the model loads)."""

    kpi: Path | None = option(None, "--kpi", help=(
        "KPI file (YAML) to watch live: gauges on /metrics, GET /kpi, a log line on breach and recovery."))
    baseline_report: Path | None = option(None, "--baseline-report", help=(
        "With --kpi: profile report.json whose throughput degradation_threshold compares with."))
    gpu_hour_cost: float | None = option(None, "--gpu-hour-cost",
                                         help="With --kpi: USD per GPU hour (cost gates, budget burn).")
    monthly_budget: float | None = option(None, "--monthly-budget",
                                          help="With --kpi: USD per month that cost.budget_alert is a share of.")
    eval_text: Path | None = option(None, "--eval-text", help=(
        "With --kpi: text the accuracy probe scores (default: the builtin corpus's held-out text)."))


@app.command()
@with_options(engine_config=EngineConfig, watch=KpiWatch)
def serve(
    model: Annotated[str, typer.Argument(help="Model or artifact to serve.")],
    engine_config: EngineConfig,
    engine_config_given: dict,
    watch: KpiWatch,
    host: Annotated[str, typer.Option("--host", help="Interface to bind (loopback unless you say otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", help="Require `Authorization: Bearer KEY` (all but /health).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="builtin or vllm.")] = "builtin",
    max_waiting: Annotated[int, typer.Option("--max-waiting", min=0, help="Queued requests beyond which new ones get 429.")] = 256,
    served_model_name: Annotated[str | None, typer.Option("--served-model-name", help="Name clients use (default: MODEL).")] = None,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", min=1, help="vLLM only.")] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option("--pipeline-parallel-size", min=1, help="vLLM only.")] = 1,
) -> None:
    """Serve MODEL behind an OpenAI-compatible HTTP API."""
    from optcli.checkpoints.resolve import resolve_model
    from optcli.vllm.argv import VllmOptions

    name = served_model_name or model
    vllm = VllmOptions(tensor_parallel_size, pipeline_parallel_size, engine_config_given["max_model_len"])
    with guard(False):
        if engine not in ("builtin", "vllm"):
            raise UsageError(f"--engine must be builtin or vllm (got '{engine}')")
        if api_key is not None and not api_key.strip():
            raise UsageError("--api-key is empty: give a key, or leave the option out to serve without one")
        from optcli.cli.serve_kpi import kpi_options

        kpi_watch = kpi_options(watch.kpi, watch.baseline_report, watch.gpu_hour_cost, watch.monthly_budget,
                                watch.eval_text, engine)
        from optcli.serve.server import bind_listener

        sock = bind_listener(host, port)  # before anything loads: a port in use is exit 2 at once
        path = str(resolve_model(model).path)
        if engine == "vllm":
            sock.close()  # vLLM binds it itself
            from optcli.vllm.argv import exec_vllm, vllm_command

            if engine_config.lm_head != "dense":
                raise UsageError("--lm-head int8 is a builtin-engine option; vLLM serves the checkpoint's head")
            exec_vllm(vllm_command(path, host, port, engine_config, vllm, served_model_name=name, api_key=api_key))
        if vllm.parallel:
            raise UsageError("the builtin engine runs on one device; use --engine vllm for parallel serving")
        from optcli.serve.server import run_server

        run_server(path, name, host, port, api_key, engine_config, max_waiting, sock=sock, kpi=kpi_watch)
