"""`ProfileArgs`: everything one `profile` run is asked to do, in four typed groups (accuracy, target,
outputs, and the workload with the `EngineConfig`), validated once by `check()` before any model loads.

Each group's fields are declared with their flag, help and limits (`config.option`), so `cli/flags.py`
makes `optcli profile`'s options from them: a new profile option is one field here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optcli.bench.export import check_export_path
from optcli.bench.kpi import Kpi, load_kpi
from optcli.bench.workload import Workload
from optcli.config import REQUEST_TIMEOUT_S, EngineConfig, option
from optcli.errors import UsageError
from optcli.vllm.argv import VllmOptions, vllm_executable

ACCURACY_BACKENDS = ("engine", "transformers")
ENGINES = ("builtin", "vllm")


@dataclass(frozen=True)
class AccuracyArgs:
    baseline: str | None = option(None, "--baseline",
                                  help="Reference model for accuracy (default: the artifact's source).")
    eval_text: Path | None = option(None, "--eval-text",
                                    help="Text for accuracy (default: the builtin corpus's heldout.txt).")
    baseline_endpoint: str | None = option(None, "--baseline-endpoint", help=(
        "With --endpoint: a server of the baseline, for endpoint accuracy (or --baseline MODEL, run locally)."))
    tasks: str | None = option(None, "--tasks", help=(
        "lm-evaluation-harness tasks, comma-separated, run through the engine for the model and its baseline."))
    tasks_path: Path | None = option(None, "--tasks-path",
                                     help="Directory of local task YAMLs (+ their JSONL data), offline.")
    limit: int | None = option(None, "--limit", min=1, help="With --tasks: documents per task.")
    num_fewshot: int | None = option(None, "--num-fewshot", min=0, help="With --tasks: few-shot examples.")
    backend: str = option("engine", "--accuracy-backend", help=(
        "engine: both models through our engine as served (default); transformers: the cross-check."))

    @property
    def task_names(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()] if self.tasks else []

    def check(self) -> None:
        from optcli.bench.eval_text import read_eval_text

        if self.eval_text is not None:
            read_eval_text(self.eval_text)  # an unreadable, binary or empty file: exit 2 now, before any model loads
        if self.backend not in ACCURACY_BACKENDS:
            raise UsageError(f"--accuracy-backend must be one of {', '.join(ACCURACY_BACKENDS)} (got '{self.backend}')")
        if self.baseline_endpoint and self.baseline:
            raise UsageError("give the baseline once: --baseline MODEL (local) or --baseline-endpoint URL")


@dataclass(frozen=True)
class TargetArgs:
    """What is measured: the built-in engine in process, a server at `endpoint`, or `vllm serve` children."""

    engine: str = option("builtin", "--engine", help=(
        "builtin (in process), or vllm: each model served by `vllm serve` for the run and measured as an endpoint."))
    endpoint: str | None = option(None, "--endpoint", "--target", "--base-url", help=(
        "Load-test an OpenAI-compatible server instead (base URL, with or without /v1)."))
    api_key: str | None = option(None, "--api-key", show_default=False, help=(
        "With --endpoint: sent as a bearer token (default: $OPENAI_API_KEY, as the openai SDK reads it)."))
    request_timeout: float | None = option(None, "--request-timeout", help=(
        "With --endpoint: seconds to wait for the server's next byte (its response, or the next streamed chunk) "
        "before a request fails; a server that answers none within it ends the run (default "
        f"{REQUEST_TIMEOUT_S:g}, the openai SDK's)."))
    tokenizer: str | None = option(None, "--tokenizer", "--processor", help=(
        "With --endpoint: the tokenizer (MODEL spec) that sizes text prompts (default: MODEL if local, else the "
        "builtin one)."))
    tensor_parallel_size: int = option(1, "--tensor-parallel-size", min=1,
                                       help="--engine vllm: GPUs per model (tensor parallel).")
    pipeline_parallel_size: int = option(1, "--pipeline-parallel-size", min=1, help="--engine vllm: pipeline stages.")
    max_model_len: int | None = None  # --max-model-len as given (None: vLLM's own), for `vllm serve`

    @property
    def served(self) -> bool:
        """Each model is served by `vllm serve` for the run (and measured as an endpoint)."""
        return self.engine == "vllm"

    def vllm(self) -> VllmOptions:
        return VllmOptions(self.tensor_parallel_size, self.pipeline_parallel_size, self.max_model_len)

    def with_env(self) -> TargetArgs:
        """The API key an --endpoint run sends: --api-key, else $OPENAI_API_KEY (as the openai SDK reads it)."""
        if self.endpoint and self.api_key is None:
            return replace(self, api_key=os.environ.get("OPENAI_API_KEY", "").strip() or None)
        return self

    def check(self, accuracy: AccuracyArgs, config: EngineConfig) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be builtin or vllm (got '{self.engine}')")
        if not self.served and VllmOptions(self.tensor_parallel_size, self.pipeline_parallel_size).parallel:
            raise UsageError("the builtin engine runs on one device; --tensor/--pipeline-parallel-size need --engine vllm")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key is empty (leave it out to send none)")
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()):
            raise UsageError("--api-key (or OPENAI_API_KEY) holds characters an HTTP header cannot carry")
        if self.served:
            if self.endpoint or accuracy.baseline_endpoint:
                raise UsageError("--engine vllm starts its own servers: not with --endpoint / --baseline-endpoint")
            if accuracy.tasks:
                raise UsageError("--tasks runs the model through our engine: not with --engine vllm")
            if config.lm_head != "dense":
                raise UsageError("--lm-head int8 is a builtin-engine option; vLLM serves the checkpoint's head")
            vllm_executable()  # absent: exit 2 before anything runs
        if accuracy.baseline_endpoint and not self.endpoint:
            raise UsageError("--baseline-endpoint compares two servers: it needs --endpoint too")
        if (self.api_key is not None or self.request_timeout is not None) and not self.endpoint:
            raise UsageError("--api-key and --request-timeout are for a server load-tested with --endpoint URL")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise UsageError(f"--request-timeout must be > 0 seconds (got {self.request_timeout:g})")
        if accuracy.tasks and self.endpoint:
            raise UsageError("--tasks runs the model in process through our engine: not with --endpoint")


@dataclass(frozen=True)
class OutputArgs:
    out: Path | None = option(None, "--out", "-o", help="Directory for report.json/.md/.html.")
    export: Path | None = option(None, "--export", help=(
        "Every online request's timings and token counts, one row each (.jsonl or .csv)."))
    kpi: Path | None = option(None, "--kpi", help="KPI gates (YAML); a failure exits 3.")
    gpu_hour_cost: float | None = option(None, "--gpu-hour-cost",
                                         help="USD per hour of the machine, for cost per 1K tokens.")

    def check(self) -> Kpi | None:
        """Where the results go, checked now rather than after minutes of measuring; the KPI file, parsed."""
        from optcli.report import check_out

        if self.out is not None:
            check_out(Path(self.out))
        check_export_path(self.export)
        if self.gpu_hour_cost is not None and self.gpu_hour_cost < 0:
            raise UsageError("--gpu-hour-cost must be >= 0")
        return load_kpi(self.kpi) if self.kpi is not None else None


@dataclass(frozen=True)
class Checked:
    """What `ProfileArgs.check` read on the way: the KPI gates and the task index (None when not asked)."""

    kpi: Kpi | None
    tasks: Any


@dataclass(frozen=True)
class ProfileArgs:
    model: str
    workload: Workload = field(default_factory=Workload)
    accuracy: AccuracyArgs = field(default_factory=AccuracyArgs)
    target: TargetArgs = field(default_factory=TargetArgs)
    outputs: OutputArgs = field(default_factory=OutputArgs)
    config: EngineConfig = field(default_factory=EngineConfig)
    dataset_path: Path | None = None  # the --dataset file `workload.dataset` was read from (for the report)

    def check(self) -> Checked:
        """Every check that needs no model, in one place: a bad flag is exit 2 before anything loads."""
        kpi = self.outputs.check()
        self.accuracy.check()
        self.target.check(self.accuracy, self.config)
        self.workload.measured_window(self.workload.requests)
        tasks = None
        if self.accuracy.tasks:
            from optcli.bench.tasks import task_manager

            # unknown or hub-only tasks fail here, before any model runs
            tasks = task_manager(self.accuracy.task_names, self.accuracy.tasks_path)
        return Checked(kpi, tasks)
