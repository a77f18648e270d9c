"""Task accuracy with lm-evaluation-harness, our engine as its model backend: what engineers judge a
quantized model by (recovery of the source's task scores), measured through the engine that serves it.

`EngineHarnessLM` answers the harness's three request kinds, each batch through continuous batching
(one `Engine.generate` call): `loglikelihood` and `loglikelihood_rolling` from prompt log-probs (sum over
the continuation's tokens, and whether each was the greedy choice: rank 1), `generate_until` by greedy
generation with the stop strings. The harness is imported only when tasks are asked for (heavy, optional).
A task is a harness task name, or a local YAML (+ JSONL data) under `--tasks-path`; a task whose dataset
must come from the Hugging Face hub fails with exit 2 offline, naming it and the local way.
"""

from __future__ import annotations

from pathlib import Path

from optcli.engine import Engine, SamplingParams
from optcli.errors import UsageError

LOCAL_HINT = ("give it locally: --tasks-path DIR holding a task YAML whose dataset is a local file "
              "(dataset_path: json, dataset_kwargs: {data_files: {test: FILE.jsonl}})")


def _harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UsageError("--tasks needs lm-evaluation-harness: pip install 'lm_eval>=0.4.8,<0.5'") from None
    from lm_eval.api.model import LM

    return LM


def engine_harness_lm(engine: Engine):
    """An lm-evaluation-harness `LM` over our engine (the class is built here: the harness is optional)."""
    LM = _harness()

    class EngineHarnessLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.engine, self.tok = engine, engine.tokenizer
            self.max_length = engine.max_model_len
            bos = getattr(self.tok, "bos_token_id", None)
            self.prefix = [bos if bos is not None else sorted(engine.eos_token_ids)[0]]

        def _pairs(self, context: str, continuation: str) -> tuple[list[int], int]:
            """(ids, number of continuation tokens): context + continuation encoded together (so the
            tokenizer sees the join as it would in text), cut from the left to the engine's length."""
            whole = self.tok(context + continuation, add_special_tokens=False).input_ids
            ctx = self.tok(context, add_special_tokens=False).input_ids if context else []
            n_cont = max(1, len(whole) - len(ctx))
            ids = (self.prefix + whole)[-self.max_length:]
            return ids, min(n_cont, len(ids) - 1)

        def _score(self, prompts: list[list[int]], counts: list[int]) -> list[tuple[float, bool]]:
            params = SamplingParams(max_tokens=1, prompt_logprobs=0)
            outs = self.engine.generate(prompts, params) if prompts else []
            results = []
            for out, n in zip(outs, counts, strict=True):
                tail = out.prompt_logprobs[-n:]  # entry j: the token at position j + 1 given the ones before
                results.append((sum(e[0] for e in tail), all(e[1] == 1 for e in tail)))
            return results

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = [self._pairs(*req.args) for req in requests]
            return self._score([p for p, _ in pairs], [n for _, n in pairs])

        def loglikelihood_rolling(self, requests) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            prompts, counts, owner = [], [], []
            for i, req in enumerate(requests):
                ids = self.tok(req.args[0], add_special_tokens=False).input_ids
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                        ids, prefix_token=self.prefix[0], max_seq_len=self.max_length, context_len=1)):
                    prompts.append(ctx + cont)
                    counts.append(len(cont))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (lp, _) in zip(owner, self._score(prompts, counts), strict=True):
                totals[i] += lp
            return totals

        def generate_until(self, requests) -> list[str]:
            prompts, params = [], []
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = self.tok(context, add_special_tokens=False).input_ids
                budget = int(kwargs.get("max_gen_toks", 256))
                prompts.append((self.prefix + ids)[-(self.max_length - budget):])
                params.append(SamplingParams(max_tokens=budget, temperature=0.0, stop=until or None))
            return [o.text for o in self.engine.generate(prompts, params)] if prompts else []

    return EngineHarnessLM()


def task_manager(tasks: list[str], tasks_path: Path | None):
    """The harness's task index (with `tasks_path`'s YAMLs), after checking every name is a task there."""
    _harness()
    from lm_eval.tasks import TaskManager

    if tasks_path is not None and not tasks_path.is_dir():
        raise UsageError(f"--tasks-path must be a directory of task YAMLs (got {tasks_path})")
    manager = TaskManager(include_path=str(tasks_path) if tasks_path else None, verbosity="ERROR")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {tasks_path}" if tasks_path else ""
        raise UsageError(f"unknown task(s) {', '.join(unknown)}: not a lm-evaluation-harness task{where}; "
                         + LOCAL_HINT)
    for name in tasks:  # build each task's dataset now, so a hub-only task fails before any model runs
        try:
            manager.load_task_or_group([name])
        except Exception as e:  # the hub offline, a missing data file: the harness raises many kinds
            raise UsageError(f"task '{name}' could not load its dataset ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:160]}); {LOCAL_HINT}") from None
    return manager


def run_tasks(engine: Engine, tasks: list[str], manager, limit: int | None, num_fewshot: int | None) -> dict:
    """{task: {metric: value}} for one model; the harness's stderr entries and aliases dropped."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=engine_harness_lm(engine), tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    scores = {}
    for task, metrics in (results or {}).get("results", {}).items():
        scores[task] = {name.split(",")[0]: float(v) for name, v in metrics.items()
                        if "_stderr" not in name and not name.startswith("sample_len")
                        and isinstance(v, int | float) and not isinstance(v, bool)}
    return scores


def task_rows(candidate: dict, baseline: dict | None) -> list[dict]:
    """accuracy.tasks of report.json: one row per task and metric, recovery = candidate / baseline."""
    rows = []
    for task in sorted(candidate):
        for metric, value in sorted(candidate[task].items()):
            base = (baseline or {}).get(task, {}).get(metric)
            rows.append({"task": task, "metric": metric, "candidate": value, "baseline": base,
                         "recovery": value / base if base else None})
    return rows
