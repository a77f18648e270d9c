"""An OpenAI-compatible server at `--endpoint`: its online levels (text prompts by default, sized by a
tokenizer), and its accuracy from echoed top-k log-probs against a local baseline or a second server."""

from __future__ import annotations

from pathlib import Path

from optcli.bench.args import ProfileArgs
from optcli.bench.dataset import LengthsFrom
from optcli.bench.endpoint_accuracy import TOP_K, endpoint_accuracy, endpoint_scorer, engine_scorer
from optcli.bench.eval_text import read_eval_text
from optcli.bench.load_generator import Server
from optcli.bench.measure import online_load
from optcli.bench.sweep import run_levels
from optcli.bench.targets.base import Measured
from optcli.bench.workload import Workload
from optcli.checkpoints.resolve import resolve_model
from optcli.engine import Engine
from optcli.errors import UsageError


class EndpointTarget:
    in_process = False
    has_baseline = False  # its accuracy may have a baseline, its speed figures never do

    def __init__(self, args: ProfileArgs) -> None:
        self.args = args
        t = args.target
        self.server = Server(t.endpoint, args.model, t.api_key, t.request_timeout)

    def engine_info(self) -> None:
        return None  # a server we did not start: its options are its own

    def accuracy(self, eval_text: Path | None, step) -> dict | None:
        acc = self.args.accuracy
        if not (acc.baseline or acc.baseline_endpoint):
            return None
        step(f"accuracy of {self.server.url} against the baseline (top-{TOP_K} log-probs)")
        text = read_eval_text(eval_text)
        baseline = Server(acc.baseline_endpoint, self.server.model, self.server.api_key,
                          self.server.request_timeout) if acc.baseline_endpoint else acc.baseline
        return measure_endpoint_accuracy(self.server, baseline, text, self.args.target.tokenizer, self.args.config)

    def measure(self, workload: Workload, slo: dict | None, step) -> Measured:
        text = (workload.prompt_format or "text") == "text"
        levels, meta = endpoint_levels(self.server, workload, slo, self.args.target.tokenizer, text, step)
        return Measured(levels=levels, online=levels[-1][1], workload=meta)


def measure_endpoint_accuracy(server: Server, baseline: Server | str, text: str, tokenizer: str | None,
                              config) -> dict:
    """The server's accuracy from its echoed top-k log-probs against a local baseline MODEL (through our
    engine, cut to the same top-k) or another server serving the same model name (sent the same key)."""
    local = server.model.startswith("builtin:") or Path(server.model).expanduser().is_dir()
    spec = tokenizer or (server.model if local else baseline if isinstance(baseline, str) else None)
    if spec is None:
        raise UsageError("endpoint accuracy sends token ids, so it needs the server's tokenizer: pass --tokenizer "
                         "MODEL, or MODEL as a local directory")
    tok, _ = endpoint_tokenizer(server.model, spec)
    ids = tok(text, verbose=False).input_ids
    candidate = _scorer(server)
    if isinstance(baseline, Server):
        return endpoint_accuracy(candidate, _scorer(baseline), ids)
    engine = Engine(str(resolve_model(baseline).path), config)
    return endpoint_accuracy(candidate, engine_scorer(engine), ids, ctx=min(256, engine.max_model_len))


def _scorer(server: Server):
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else None
    return endpoint_scorer(server.url, server.model, timeout_s=server.timeout_s, headers=headers)


def endpoint_levels(server: Server, workload: Workload, slo: dict | None, tokenizer: str | None, text: bool,
                    step) -> tuple[list, dict]:
    """The online levels against a server, and what they add to report.workload (the request timeout, the
    tokenizer that sized the prompts): prompts sized by `endpoint_tokenizer` (`text`: sent as text, a
    dataset's chat rows as chat completions). A `step` with a `load` method gets each level's live state."""
    meta: dict = {"request_timeout_s": server.timeout_s}
    tok = None
    if text or tokenizer or isinstance(workload.output_len, LengthsFrom):
        tok, meta["tokenizer"] = endpoint_tokenizer(server.model, tokenizer)
    vocab = (3, min(len(tok), 32000)) if tok is not None else (3, 500)  # ids below every real vocab size

    def run_one(level, order: int):
        step(f"online load against {server.url}: {level.label}")
        return online_load(None, server, workload, level, slo, vocab, tok if text else None, chat=text,
                           seed_offset=order, progress=getattr(step, "load", None))

    return run_levels(workload, run_one), meta


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
