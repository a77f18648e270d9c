"""The llama.cpp peer for quant_cpu.py: the same HF Llama checkpoint as GGUF bf16 / q8_0 / q4_0, at batch 1 on CPU.

It runs in its own virtual environment, with `llama-cpp-python` (which compiles llama.cpp), `gguf` and
`numpy`. It needs neither torch nor transformers:

    python -m venv /tmp/llamacpp-venv
    /tmp/llamacpp-venv/bin/pip install llama-cpp-python gguf numpy

1. Conversion. The checkpoint's safetensors (bf16 or fp32) are read with numpy and written as
   GGUF bf16 with the `gguf` package's writer. The 2-D weights go in as bf16 and the norms as f32.
   q_proj and k_proj are permuted into llama.cpp's RoPE layout, as convert_hf_to_gguf.py does, and a
   tied LM head is left to token_embd. The vocabulary comes from the checkpoint's tokenizer.json (a
   SentencePiece-style BPE with byte fallback, llama.cpp's "llama" tokenizer), padded to the model's
   vocab_size. q8_0 and q4_0 are then made with llama.cpp's own quantizer,
   `llama_cpp.llama_model_quantize`.
2. `--check` (small models): a numpy fp32 forward of the HF checkpoint is compared with llama.cpp's
   bf16 GGUF on the logits of a 16-token prompt. This catches a wrong permutation or layout.
3. Timing, for each type: `llama_cpp.Llama(path, n_threads=2)`, warmed up, then a 64-token random
   prompt (ids in [3, 1000)) and 64 greedy new tokens through `Llama.generate`. Prompt tok/s = 64 ÷
   time to the first token; decode tok/s = the tokens after the first ÷ the time after the first.
   EOS does not stop the run (the loop takes exactly 64 tokens).

    /tmp/llamacpp-venv/bin/python benchmarks/llamacpp_peer.py --small --check   # quant_cpu.py --small's checkpoint
    /tmp/llamacpp-venv/bin/python benchmarks/llamacpp_peer.py --model-dir DIR --types bf16,q4_0 --json out.json

Without `--model-dir` it uses quant_cpu.py's checkpoint under `$OPTCLI_CACHE/bench/` (run quant_cpu.py
first: this script does not build one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np

PROMPT_ID_RANGE = (3, 1000)
PROMPT_LEN, NEW_TOKENS = 64, 64
TYPES = ("bf16", "q8_0", "q4_0")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def default_model_dir(small: bool) -> Path:
    cache = Path(os.environ.get("OPTCLI_CACHE", Path.home() / ".cache" / "optcli"))
    name = "llama-small-h256-l2-v1024" if small else "llama-3.2-1b-shape"
    return cache / "bench" / name / "bf16"


# --- reading the HF checkpoint ------------------------------------------------------------------


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint, memory-mapped: bf16 as uint16 bit patterns, f32/f16 as themselves."""
    dtypes = {"BF16": np.uint16, "F32": np.float32, "F16": np.float16}
    tensors: dict[str, np.ndarray] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            arr = raw[8 + size + start : 8 + size + end].view(dtypes[info["dtype"]]).reshape(info["shape"])
            tensors[name] = arr
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return tensors


def as_f32(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:  # bf16 bits: the top half of an fp32
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def as_bf16_bits(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:
        return np.ascontiguousarray(arr)
    import gguf

    return gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.BF16)


def rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's half-split RoPE rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- conversion ---------------------------------------------------------------------------------


def vocab_entries(model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int], dict]:
    """(tokens, scores, types, special ids) from tokenizer.json, padded to the model's vocab_size."""
    import gguf

    tok = json.loads((model_dir / "tokenizer.json").read_text())
    model = tok["model"]
    if model["type"] != "BPE" or not model.get("byte_fallback"):
        raise SystemExit("only a SentencePiece-style BPE tokenizer with byte fallback is converted here")
    by_id = {i: t for t, i in model["vocab"].items()}
    specials = {a["id"]: a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    by_id.update(specials)
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i, f"[PAD{i}]")
        tokens.append(text.encode("utf-8"))
        scores.append(-float(i))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(gguf.TokenType.BYTE)
        elif i in specials:
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.NORMAL)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    ids = {v: k for k, v in by_id.items()}
    special = {k: ids[cfg[f"{k}_token"]] for k in ("bos", "eos", "unk") if cfg.get(f"{k}_token") in ids}
    return tokens, scores, types, special


def convert_bf16(model_dir: Path, out: Path) -> None:
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    tokens, scores, types, special = vocab_entries(model_dir, cfg["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for key, tid in special.items():
        getattr(w, f"add_{key}_token_id")(tid)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    tied = cfg.get("tie_word_embeddings", False)
    for name, arr in read_safetensors(model_dir).items():
        if name == "lm_head.weight" and tied:
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        target = f"blk.{m.group(1)}.{per_layer[m.group(2)]}.weight" if m else names[name]
        if target.endswith("attn_q.weight"):
            arr = rope_permute(arr, heads)
        elif target.endswith("attn_k.weight"):
            arr = rope_permute(arr, kv_heads)
        if arr.ndim == 1:
            w.add_tensor(target, as_f32(arr))
        else:
            w.add_tensor(target, as_bf16_bits(arr), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(src: Path, dst: Path, kind: str, threads: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = threads
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed ({rc})")
    tmp.rename(dst)


def make_ggufs(model_dir: Path, outdir: Path, kinds: list[str], threads: int) -> dict[str, Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {k: outdir / f"model-{k}.gguf" for k in TYPES}
    stamp = outdir / "source.json"
    source = {"model_dir": str(model_dir.resolve()),
              "mtime": max(p.stat().st_mtime for p in model_dir.glob("*.safetensors"))}
    if not stamp.is_file() or json.loads(stamp.read_text()) != source:
        for p in paths.values():
            p.unlink(missing_ok=True)
        stamp.write_text(json.dumps(source))
    if not paths["bf16"].is_file():
        log(f"converting {model_dir} -> {paths['bf16']}")
        tmp = paths["bf16"].with_suffix(".tmp")
        convert_bf16(model_dir, tmp)
        tmp.rename(paths["bf16"])
    for kind in kinds:
        if kind != "bf16" and not paths[kind].is_file():
            log(f"quantizing -> {paths[kind]}")
            quantize_gguf(paths["bf16"], paths[kind], kind, threads)
    return {k: paths[k] for k in kinds}


# --- reference check ----------------------------------------------------------------------------


def numpy_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """The HF Llama forward in numpy fp32 (causal, no cache): logits [T, V]."""
    cfg = json.loads((model_dir / "config.json").read_text())
    t = {k: as_f32(v) for k, v in read_safetensors(model_dir).items()}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    eps, n = cfg["rms_norm_eps"], len(ids)

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [T, H, D], half-split (HF rotate_half)
        half = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return (x * cos[:, None] + half * sin[:, None]).astype(np.float32)

    x = t["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, t[p + "input_layernorm.weight"])
        q = rope((h @ t[p + "self_attn.q_proj.weight"].T).reshape(n, heads, hd))
        k = rope((h @ t[p + "self_attn.k_proj.weight"].T).reshape(n, kv_heads, hd))
        v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(n, kv_heads, hd)
        rep = heads // kv_heads
        k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", s, v).reshape(n, heads * hd)
        x = x + attn @ t[p + "self_attn.o_proj.weight"].T
        h = norm(x, t[p + "post_attention_layernorm.weight"])
        g, u = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ t[p + "mlp.down_proj.weight"].T
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return norm(x, t["model.norm.weight"]) @ head.T


def check_against_numpy(model_dir: Path, gguf_path: Path, threads: int) -> dict:
    from llama_cpp import Llama

    ids = [random.Random(1).randrange(*PROMPT_ID_RANGE) for _ in range(16)]
    ref = numpy_logits(model_dir, ids)
    llm = Llama(model_path=str(gguf_path), n_ctx=64, n_threads=threads, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    del llm
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return {"max_rel_err": err, "top1_agreement": top1}


# --- timing -------------------------------------------------------------------------------------


def timed_generate(llm, prompt: list[int], new_tokens: int) -> dict:
    llm.reset()
    start = time.perf_counter()
    t_first = None
    count = 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
        if count == new_tokens:
            break
    end = time.perf_counter()
    return {"prompt_tok_s": len(prompt) / (t_first - start), "decode_tok_s": (count - 1) / (end - t_first)}


def measure(path: Path, threads: int, seed: int, repeats: int) -> dict:
    """Warm-up, then `repeats` timed runs with fresh prompts; each figure is the best of its repeats."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    rng = random.Random(seed)

    def prompt() -> list[int]:
        return [rng.randrange(*PROMPT_ID_RANGE) for _ in range(PROMPT_LEN)]

    timed_generate(llm, prompt(), 8)  # warm-up
    best: dict = {}
    for _ in range(repeats):
        row = timed_generate(llm, prompt(), NEW_TOKENS)
        best = {k: max(v, best.get(k, 0.0)) for k, v in row.items()}
    del llm
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a test of this script: q4_0 of quant_cpu.py --small's "
                    "checkpoint with --check; without llama-cpp-python (or that checkpoint), says so and exits 0")
    ap.add_argument("--model-dir", type=Path, default=None, help="HF Llama checkpoint (default: quant_cpu.py's)")
    ap.add_argument("--small", action="store_true", help="quant_cpu.py --small's checkpoint")
    ap.add_argument("--types", default=",".join(TYPES), help=f"subset of {','.join(TYPES)}")
    ap.add_argument("--outdir", type=Path, default=None, help="where the GGUF files go (default: beside the checkpoint)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="compare bf16 GGUF logits with a numpy forward (small models)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per type; each figure is the best")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.small, args.types, args.check, args.repeats = True, "bf16,q4_0", True, 1
        try:
            import gguf  # noqa: F401
            import llama_cpp  # noqa: F401
        except ImportError as e:
            print(f"skipped: {e.name} is not installed (it runs in its own venv: see this script's docstring)")
            return 0
        if not (default_model_dir(True) / "config.json").is_file():
            print("skipped: no checkpoint (run benchmarks/quant_cpu.py --small first)")
            return 0
    import llama_cpp

    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    if set(kinds) - set(TYPES):
        ap.error(f"--types: choose from {', '.join(TYPES)}")
    model_dir = args.model_dir or default_model_dir(args.small)
    if not (model_dir / "config.json").is_file():
        ap.error(f"{model_dir}: no HF checkpoint (run benchmarks/quant_cpu.py{' --small' if args.small else ''} first)")
    outdir = args.outdir or model_dir.parent / "gguf"
    log(f"python {platform.python_version()}, llama_cpp {llama_cpp.__version__}, {args.threads} threads; {model_dir}")
    paths = make_ggufs(model_dir, outdir, kinds, args.threads)
    result: dict = {"model_dir": str(model_dir), "threads": args.threads, "types": {}}
    if args.check:
        result["check"] = check_against_numpy(model_dir, make_ggufs(model_dir, outdir, ["bf16"], args.threads)["bf16"],
                                              args.threads)
        log(f"bf16 GGUF vs numpy fp32 forward: max relative logit error {result['check']['max_rel_err']:.2e}, "
            f"top-1 agreement {result['check']['top1_agreement']:.0%}")
    for kind, path in paths.items():
        row = measure(path, args.threads, args.seed, args.repeats)
        row["file_mib"] = path.stat().st_size / 2**20
        result["types"][kind] = row
        log(f"{kind}: prompt {row['prompt_tok_s']:.1f} tok/s, decode {row['decode_tok_s']:.1f} tok/s")
    print(f"\n## llama.cpp, batch 1, {PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens, {args.threads} threads\n")
    print("| type | file MiB | prompt tok/s | decode tok/s | prompt vs bf16 | decode vs bf16 |")
    print("|---|---|---|---|---|---|")
    base = result["types"].get("bf16")
    for kind, r in result["types"].items():
        ratios = [f"{r[k] / base[k]:.2f}x" if base else "" for k in ("prompt_tok_s", "decode_tok_s")]
        print(f"| {kind} | {r['file_mib']:.1f} | {r['prompt_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
              + " | ".join(ratios) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
