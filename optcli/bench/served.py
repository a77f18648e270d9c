"""Profiling a served model: the online levels against an OpenAI-compatible server, its accuracy from echoed
top-k log-probs, and `--engine vllm` (the artifact, then its source, each served by `vllm serve` for the run)."""

from __future__ import annotations

from pathlib import Path

from optcli.bench.accuracy import token_windows
from optcli.bench.dataset import LengthsFrom
from optcli.bench.endpoint_accuracy import endpoint_accuracy, endpoint_scorer, engine_scorer
from optcli.bench.load_generator import DEFAULT_REQUEST_TIMEOUT_S
from optcli.bench.measure import online_load
from optcli.bench.sweep import run_levels
from optcli.bench.vllm_server import VllmOptions, vllm_server
from optcli.bench.workload import Workload
from optcli.checkpoints.resolve import resolve_model
from optcli.config import EngineConfig
from optcli.engine import Engine
from optcli.errors import UsageError


def measure_endpoint_accuracy(endpoint: str, model: str, baseline: str | None, baseline_endpoint: str | None,
                              text: str, tokenizer: str | None, config: EngineConfig, api_key: str | None = None,
                              request_timeout: float | None = None) -> dict:
    """The endpoint's accuracy from its echoed top-k log-probs against a local baseline (through our engine,
    cut to the same top-k) or another endpoint serving the same model name (sent the same `api_key`)."""
    spec = tokenizer or (model if model.startswith("builtin:") or Path(model).expanduser().is_dir() else baseline)
    if spec is None:
        raise UsageError("endpoint accuracy sends token ids, so it needs the server's tokenizer: pass --tokenizer "
                         "MODEL, or MODEL as a local directory")
    tok, _ = endpoint_tokenizer(model, spec)
    ids = tok(text, verbose=False).input_ids
    options = {"timeout_s": request_timeout or DEFAULT_REQUEST_TIMEOUT_S,
               "headers": {"Authorization": f"Bearer {api_key}"} if api_key else None}
    candidate = endpoint_scorer(endpoint, model, **options)
    if baseline_endpoint:
        return endpoint_accuracy(candidate, endpoint_scorer(baseline_endpoint, model, **options), ids)
    engine = Engine(str(resolve_model(baseline).path), config)
    return endpoint_accuracy(candidate, engine_scorer(engine), ids, ctx=min(256, engine.max_model_len))


def endpoint_levels(endpoint: str, model: str, workload: Workload, slo, tokenizer: str | None, meta: dict,
                    step, api_key: str | None = None, request_timeout: float | None = None) -> list:
    """The online levels against a server: prompts sized by `endpoint_tokenizer` (text by default), a
    dataset's chat rows as chat completions; `api_key` sent as a bearer token, `request_timeout` s the longest
    wait for the server's next byte. A `step` with a `load` method gets the live state of each level's run."""
    meta["request_timeout_s"] = request_timeout or DEFAULT_REQUEST_TIMEOUT_S
    text = meta["prompt_format"] == "text"
    tok = None
    if text or tokenizer or isinstance(workload.output_len, LengthsFrom):
        tok, meta["tokenizer"] = endpoint_tokenizer(model, tokenizer)
    vocab = (3, min(len(tok), 32000)) if tok is not None else (3, 500)  # ids below every real vocab size

    def run_one(level, order: int):
        step(f"online load against {endpoint}: {level.label}")
        return online_load(None, endpoint, model, workload, level, slo, vocab, tok if text else None, chat=text,
                           seed_offset=order, api_key=api_key, request_timeout=request_timeout,
                           progress=getattr(step, "load", None))

    return run_levels(workload, run_one)


def endpoint_tokenizer(model: str, spec: str | None):
    """(tokenizer, label) that sizes prompts for a server: `--tokenizer`, else MODEL when it is a local
    model, else the builtin one (then lengths are approximate: the server's usage counts are what count)."""
    from transformers import AutoTokenizer  # heavy: only for --endpoint runs

    label = spec
    if spec is None:
        local = model.startswith("builtin:") or Path(model).expanduser().is_dir()
        spec = model if local else "builtin:tiny-llama"
        label = spec if local else f"{spec} (not the server's: prompt lengths approximate)"
    return AutoTokenizer.from_pretrained(resolve_model(spec).path), label


def measure_vllm(source, baseline_source, model: str, workload: Workload, slo, text: str, config: EngineConfig,
                 options: VllmOptions, meta: dict, step) -> tuple[list, dict | None, dict | None]:
    """The artifact served by vLLM at every load level, then its source at the headline level, one server at
    a time; each scores the evaluation text's windows while it is up. Returns (the artifact's levels, the
    source's headline summary or None, the accuracy against the source or None)."""
    from transformers import AutoConfig, AutoTokenizer

    spec = str(source.path)
    ids = AutoTokenizer.from_pretrained(source.path)(text, verbose=False).input_ids
    positions = getattr(AutoConfig.from_pretrained(source.path), "max_position_embeddings", 256)
    ctx = min(256, positions, options.max_model_len or positions)
    windows = [w for w, _ in token_windows(ids, ctx)] if baseline_source is not None else []
    with vllm_server(spec, model, config, options, step) as url:
        levels = endpoint_levels(url, model, workload, slo, spec, meta, step)
        if windows:
            step(f"accuracy of {model} under vLLM (top-k log-probs)")
        scored = [endpoint_scorer(url, model)(w) for w in windows]
    if baseline_source is None:
        return levels, None, None
    with vllm_server(str(baseline_source.path), model, config, options, step) as url:
        base = endpoint_levels(url, model, workload.only(workload.headline()), slo, spec, dict(meta), step)[-1][1]
        base_scored = [endpoint_scorer(url, model)(w) for w in windows]
    accuracy = endpoint_accuracy(_replay(scored), _replay(base_scored), ids, ctx=ctx)
    return levels, base, accuracy


def _replay(scored: list):
    """A scorer answering from windows scored earlier, in the same order (the two servers never run together)."""
    answers = iter(scored)
    return lambda window: next(answers)
