"""What every target gives the profile orchestrator: the `Target` protocol and its typed result, `Measured`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from optcli.bench.model_run import ModelRun
from optcli.bench.workload import Workload


@dataclass
class Measured:
    """A target's speed figures. `levels`: the candidate's online summary per load level, in the order run,
    the headline last; `online`: the headline level's summary (the median over repeats where there were
    repeats). The rest is None where the target does not measure it."""

    levels: list
    online: dict
    candidate: ModelRun | None = None  # in process: offline, batch-1 and online figures over the repeats
    baseline: ModelRun | None = None
    baseline_online: dict | None = None  # the source at the headline level
    accuracy: dict | None = None  # measured while the servers were up (vLLM: top-k log-probs)
    workload: dict[str, Any] = field(default_factory=dict)  # what the run adds to report.workload


class Target(Protocol):
    """One kind of thing `profile` measures: the built-in engine in process, a server at a URL, or `vllm
    serve` children. `in_process`: the offline, batch-1 and roofline figures exist (the models run here)."""

    in_process: bool
    has_baseline: bool  # a baseline is measured in this run (KPI relative gates need one)

    def engine_info(self) -> dict | None:
        """report.workload.engine before the run (the options it runs with); None for a server we did not start."""

    def accuracy(self, eval_text: Path | None, step) -> dict | None:
        """Accuracy against the baseline before the speed runs (None: none to measure, or measured in `measure`)."""

    def measure(self, workload: Workload, slo: dict | None, step) -> Measured:
        """The speed runs."""
