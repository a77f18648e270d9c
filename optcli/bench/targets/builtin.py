"""The built-in engine in process: the artifact and its source in interleaved repeats (`repeats.py`), their
accuracy through the engine (or transformers, the cross-check), the int8 LM head's cost, lm-eval tasks."""

from __future__ import annotations

from pathlib import Path

from optcli.bench.accuracy import EngineLM, evaluate, evaluate_in_turn
from optcli.bench.args import ProfileArgs
from optcli.bench.engine_accuracy import kv_cache_is_quantized, measure_kv_accuracy
from optcli.bench.eval_text import read_eval_text
from optcli.bench.measure import free_device_memory
from optcli.bench.repeats import measure_models
from optcli.bench.targets.base import Measured
from optcli.bench.tasks import run_tasks, task_rows
from optcli.bench.workload import Workload
from optcli.config import EngineConfig
from optcli.engine import Engine

ACCURACY_KEYS = ("ppl", "baseline_ppl", "ppl_ratio", "kld_mean", "kld_p99", "top1_agreement")


class BuiltinTarget:
    in_process = True

    def __init__(self, args: ProfileArgs, source, baseline_source) -> None:
        self.args, self.config = args, args.config
        self.source, self.baseline_source = source, baseline_source
        self.has_baseline = baseline_source is not None

    def engine_info(self) -> dict:
        # the engine options both models run with (what `serve` would run); dtype and kernels resolved at load
        return {**self.config.as_dict(), "dtype_requested": self.config.dtype, "dtype_reason": None,
                "kernels": None, "baseline_kernels": None}

    def accuracy(self, eval_text: Path | None, step) -> dict | None:
        """PPL, KLD and top-1 against the baseline, and (`--lm-head int8`) what rounding the head costs."""
        acc = None
        if self.baseline_source is not None:
            step("accuracy against the baseline")
            scores = measure_accuracy(self.source.path, self.baseline_source.path, read_eval_text(eval_text),
                                      self.config, self.args.accuracy.backend)
            acc = {k: scores[k] for k in ACCURACY_KEYS}
        if self.config.lm_head != "dense":
            step(f"accuracy cost of the {self.config.lm_head} LM head")
            # the rounded head against the dense one, both through the engine (the accuracy above may be transformers')
            acc = (acc or dict.fromkeys(ACCURACY_KEYS)) | {
                "lm_head": measure_head_accuracy(self.source.path, read_eval_text(eval_text), self.config)}
        if kv_cache_is_quantized(self.source.path, self.config):
            step("accuracy cost of the 8-bit KV cache (decode and chunked prefill, against a bf16 cache)")
            acc = (acc or dict.fromkeys(ACCURACY_KEYS)) | {
                "kv_cache": measure_kv_accuracy(self.source.path, read_eval_text(eval_text), self.config)}
        return acc

    def tasks(self, manager, step) -> list[dict]:
        """lm-evaluation-harness tasks through the engine, for the model and (given) its baseline."""
        acc = self.args.accuracy
        step(f"tasks {', '.join(acc.task_names)} (lm-evaluation-harness through the engine)")
        scores = {}
        for side, spec in (("candidate", self.source), ("baseline", self.baseline_source)):
            if spec is not None:
                engine = Engine(str(spec.path), self.config)
                scores[side] = run_tasks(engine, acc.task_names, manager, acc.limit, acc.num_fewshot)
                free_device_memory(self.config.device)
        return task_rows(scores["candidate"], scores.get("baseline"))

    def measure(self, workload: Workload, slo: dict | None, step) -> Measured:
        # both models in interleaved repeats, after an untimed warm-up each (repeats.py)
        cand, base, schedule = measure_models(self.source, self.baseline_source, workload, slo, self.config, step)
        free_device_memory(self.config.device)
        return Measured(levels=cand.levels, online=cand.online, candidate=cand, baseline=base,
                        baseline_online=base.online if base is not None else None, workload={"repeats": schedule})


def measure_accuracy(model_path: Path, baseline_path: Path, eval_text: str, config: EngineConfig,
                     backend: str = "engine") -> dict:
    """PPL, KLD and top-1 agreement of the model against its baseline on the same tokens: through our engine,
    each model in the dtype and kernels it is served with (`config`, as `serve` would run it), one model
    resident at a time; or through transformers (the cross-check: its own kernels, the baseline in fp32)."""
    if backend == "transformers":
        return transformers_accuracy(model_path, baseline_path, eval_text, config.device)
    from transformers import AutoConfig, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(baseline_path)(eval_text, verbose=False).input_ids
    positions = getattr(AutoConfig.from_pretrained(baseline_path), "max_position_embeddings", 256)
    ctx = min(256, positions, config.max_model_len or positions)

    def load(path: Path):  # the engine is built when its turn comes, and nothing here keeps it
        return lambda: EngineLM(Engine(str(path), config))

    return evaluate_in_turn(load(model_path), load(baseline_path), ids, ctx=ctx).as_dict()


def transformers_accuracy(model_path: Path, baseline_path: Path, eval_text: str, device: str) -> dict:
    """The artifact as transformers loads it against the baseline in fp32, on the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer(eval_text, verbose=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_path, device_map=device).eval()
    baseline = AutoModelForCausalLM.from_pretrained(baseline_path, dtype=torch.float32, device_map=device).eval()
    ctx = min(256, getattr(model.config, "max_position_embeddings", 256))
    return evaluate(model, ids, baseline, ctx=ctx).as_dict()


def measure_head_accuracy(model_path: Path, eval_text: str, config: EngineConfig) -> dict:
    """What `config.lm_head` (int8) costs in accuracy: the engine with that head against the same model
    with its dense head, on the same tokens through the same engine (so only the head differs)."""
    rounded = Engine(str(model_path), config)
    ids = rounded.tokenizer(eval_text, verbose=False).input_ids
    ctx = min(256, rounded.max_model_len)
    dense = Engine(str(model_path), config.with_options(lm_head="dense"))
    return {"format": config.lm_head, **evaluate(EngineLM(rounded), ids, EngineLM(dense), ctx=ctx).as_dict()}
