"""`--engine vllm`: the artifact, then its source, each served by `vllm serve` for the run (one server at a
time, so a model that needs every GPU can be measured, then its source) and measured as an endpoint; each
scores the evaluation text's windows while it is up, for the accuracy of one against the other."""

from __future__ import annotations

from pathlib import Path

from optcli.bench.accuracy import token_windows
from optcli.bench.args import ProfileArgs
from optcli.bench.endpoint_accuracy import endpoint_accuracy, endpoint_scorer
from optcli.bench.eval_text import read_eval_text
from optcli.bench.load_generator import Server
from optcli.bench.targets.base import Measured
from optcli.bench.targets.endpoint import endpoint_levels
from optcli.bench.workload import Workload
from optcli.vllm.server import vllm_server


class VllmTarget:
    in_process = False

    def __init__(self, args: ProfileArgs, source, baseline_source) -> None:
        self.args, self.config, self.options = args, args.config, args.target.vllm()
        self.source, self.baseline_source = source, baseline_source
        self.has_baseline = baseline_source is not None

    def engine_info(self) -> dict:
        return {"name": "vllm", **self.options.__dict__, "dtype_requested": self.config.dtype}

    def accuracy(self, eval_text: Path | None, step) -> None:
        return None  # scored while each server is up (`measure`): the two never run together

    def measure(self, workload: Workload, slo: dict | None, step) -> Measured:
        """The artifact at every load level, then its source at the headline level."""
        from transformers import AutoConfig, AutoTokenizer

        spec, model = str(self.source.path), self.args.model
        text = (workload.prompt_format or "text") == "text"
        ids, windows, ctx = [], [], 0
        if self.baseline_source is not None:
            ids = AutoTokenizer.from_pretrained(self.source.path)(read_eval_text(self.args.accuracy.eval_text),
                                                                  verbose=False).input_ids
            positions = getattr(AutoConfig.from_pretrained(self.source.path), "max_position_embeddings", 256)
            ctx = min(256, positions, self.options.max_model_len or positions)
            windows = [w for w, _ in token_windows(ids, ctx)]
        with vllm_server(spec, model, self.config, self.options, step) as url:
            levels, meta = endpoint_levels(Server(url, model), workload, slo, spec, text, step)
            if windows:
                step(f"accuracy of {model} under vLLM (top-k log-probs)")
            scored = [endpoint_scorer(url, model)(w) for w in windows]
        if self.baseline_source is None:
            return Measured(levels=levels, online=levels[-1][1], workload=meta)
        with vllm_server(str(self.baseline_source.path), model, self.config, self.options, step) as url:
            headline = workload.only(workload.headline())
            base = endpoint_levels(Server(url, model), headline, slo, spec, text, step)[0][-1][1]
            base_scored = [endpoint_scorer(url, model)(w) for w in windows]
        accuracy = endpoint_accuracy(_replay(scored), _replay(base_scored), ids, ctx=ctx)
        return Measured(levels=levels, online=levels[-1][1], baseline_online=base, accuracy=accuracy, workload=meta)


def _replay(scored: list):
    """A scorer answering from windows scored earlier, in the same order (the two servers never run together)."""
    answers = iter(scored)
    return lambda window: next(answers)
