"""Per-token cost of a JSON grammar's token mask: xgrammar vs llguidance, and llguidance in our engine.

Part 1, the libraries alone, on the builtin tiny-llama tokenizer (1,024 tokens) and the stories260K one
(512, converted from llama2.c): build each library's tokenizer and compile two grammars (any JSON
object; a small schema with a bounded string, an integer and an array), then run 2,000 steps of: fill the
next-token bitmask, apply it to random logits, sample, accept the token (a finished document restarts).
Median and p99 per operation, in microseconds.

Part 2, our engine (llguidance, the one we ship), on each of the two models: the same 16 greedy
requests of 64 tokens with and without `json_schema={"type": "object"}` (EOS ignored; a small model
writes one long JSON string, so both runs decode all 64 tokens), interleaved, best of --repeats; and
the time of the engine's own mask step (llguidance's fill plus the unpacking to a [B, V] boolean mask),
timed inside the engine, per token. The whole-step difference is noise-bound on a shared machine; the
inner timing is not.

    python benchmarks/grammar_mask.py                  # both parts (xgrammar is optional: pip install xgrammar)
    python benchmarks/grammar_mask.py --stories-dir DIR  # where stories260K.bin and tok512.bin are
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
          "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
STEPS = [2000]  # mask steps per library and grammar (a list, so --smoke can lower it)


def models(stories_dir: Path) -> dict[str, str]:
    """name → model directory: the builtin model, and stories260K converted from llama2.c when present."""
    from optcli.checkpoints.llama2c import convert_llama2c
    from optcli.checkpoints.resolve import resolve_model

    out = {"tiny-llama": str(resolve_model("builtin:tiny-llama").path)}
    if (stories_dir / "stories260K.bin").is_file():
        d = Path(tempfile.mkdtemp()) / "stories260K"
        convert_llama2c(stories_dir / "stories260K.bin", stories_dir / "tok512.bin", d)
        out["stories260K"] = str(d)
    else:
        print(f"(no stories260K.bin under {stories_dir}: tiny-llama only)")
    return out


def _loop(vocab, fill, apply, accept, done, reset) -> str:
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"fill": [], "apply": [], "accept": []}
    docs = 0
    for _ in range(STEPS[0]):
        logits = torch.randn(1, vocab, generator=gen)
        t0 = time.perf_counter()
        fill()
        t1 = time.perf_counter()
        apply(logits)
        t2 = time.perf_counter()
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        t3 = time.perf_counter()
        assert accept(token), token
        t4 = time.perf_counter()
        times["fill"].append(t1 - t0)
        times["apply"].append(t2 - t1)
        times["accept"].append(t4 - t3)
        if done():
            docs += 1
            reset()

    def us(xs):
        return f"{statistics.median(xs) * 1e6:5.1f} / {sorted(xs)[int(len(xs) * 0.99)] * 1e6:5.1f}"

    return "  ".join(f"{k} {us(v)}" for k, v in times.items()) + f"  ({docs} documents)"


def bench_xgrammar(tok, kind: str) -> str:
    import xgrammar as xgr

    t0 = time.perf_counter()
    comp = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)), max_threads=1)
    t1 = time.perf_counter()
    g = comp.compile_builtin_json_grammar() if kind == "object" else comp.compile_json_schema(json.dumps(SCHEMA))
    t2 = time.perf_counter()
    m = xgr.GrammarMatcher(g)
    bm = xgr.allocate_token_bitmask(1, len(tok))
    loop = _loop(len(tok), lambda: m.fill_next_token_bitmask(bm, 0), lambda x: xgr.apply_token_bitmask_inplace(x, bm),
                 m.accept_token, m.is_terminated, m.reset)
    return f"setup {(t1 - t0) * 1e3:5.1f} ms  compile {(t2 - t1) * 1e3:5.1f} ms  {loop}"


def bench_llguidance(tok, kind: str) -> str:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
    t1 = time.perf_counter()
    schema = {"type": "object"} if kind == "object" else SCHEMA
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
    m = llguidance.LLMatcher(lltok, grammar)
    t2 = time.perf_counter()
    bm = lt.allocate_token_bitmask(1, len(tok))
    loop = _loop(len(tok), lambda: lt.fill_next_token_bitmask(m, bm, 0), lambda x: lt.apply_token_bitmask_inplace(x, bm),
                 m.consume_token, m.is_stopped, m.reset)
    return f"setup {(t1 - t0) * 1e3:5.1f} ms  compile {(t2 - t1) * 1e3:5.1f} ms  {loop}"


def libraries(paths: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    print("part 1: the libraries alone (median / p99 us per token)")
    for name, path in paths.items():
        tok = AutoTokenizer.from_pretrained(path)
        for kind in ("object", "schema"):
            for lib, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
                try:
                    line = fn(tok, kind)
                except ImportError:
                    line = "not installed"
                print(f"  {name:12s} {kind:7s} {lib:11s} {line}", flush=True)


def engine(name: str, path: str, repeats: int, new_tokens: int = 64) -> None:
    from optcli.engine import Engine, SamplingParams

    print(f"part 2: our engine, {name}, 16 greedy requests x {new_tokens} tokens (best of {repeats}, interleaved)")
    eng = Engine(path, dtype="float32", max_num_seqs=16, max_model_len=256)
    prompts = [f"Story {i}: once upon a time" for i in range(16)]
    fill_s = [0.0]
    fill = eng.grammars.fill

    def timed_fill(matchers):  # the engine's own mask step: fill the bitmasks, unpack them to [B, V] bool
        t = time.perf_counter()
        out = fill(matchers)
        fill_s[0] += time.perf_counter() - t
        return out

    eng.grammars.fill = timed_fill
    runs = {"plain": None, "json_schema": {"type": "object"}}
    best = dict.fromkeys(runs, float("inf"))
    for schema in runs.values():
        eng.generate(prompts[:2], SamplingParams(max_tokens=4, json_schema=schema))  # warm-up (and compile)
    masked_tokens = 0
    for _ in range(repeats):
        for label, schema in runs.items():
            steps, fill_before = eng.num_steps, fill_s[0]
            t = time.perf_counter()
            outs = eng.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True, json_schema=schema))
            best[label] = min(best[label], (time.perf_counter() - t) / (eng.num_steps - steps))
            if schema is not None:
                masked_tokens += sum(len(o.token_ids) for o in outs)
                masks_s = fill_s[0] - fill_before
    for label in runs:
        print(f"  {label:12s} {best[label] * 1e3:6.2f} ms/step")
    per_token = masks_s / (masked_tokens / repeats) if masked_tokens else float("nan")
    print(f"  mask step inside the engine (llguidance fill + unpack): {per_token * 1e6:.1f} us per token, "
          f"{per_token * 16 / best['plain'] * 100:.1f}% of a plain 16-sequence step")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a test of this script: 50 mask steps, 8 tokens, 1 repeat")
    ap.add_argument("--stories-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    new_tokens = 64
    if args.smoke:
        STEPS[0], args.repeats, new_tokens = 50, 1, 8
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    paths = models(args.stories_dir)
    libraries(paths)
    for name, path in paths.items():
        engine(name, path, args.repeats, new_tokens)


if __name__ == "__main__":
    main()
