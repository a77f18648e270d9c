"""The benchmark model the GPU and quantization checks share (`gpu_check.py`, `quant_check.py`,
`decode_ops.py`, `host_overhead.py`, `quant_cpu.py`, `kv_cache_dtype.py`): the Llama-3.2-1B shape and a tiny
one, each script's workload plan around them, and a seeded random checkpoint built from a plan with the builtin
tokenizer; the log and device-sync helpers; and `timed_steps`, a run of requests timed step by step. A module the scripts import, so no script imports another.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPT_ID_RANGE = (3, 1000)  # ids that exist in the builtin tokenizer (0-2 are <unk>, <s>, </s>)

LLAMA_3_2_1B = dict(
    num_hidden_layers=16,
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
)
TINY = dict(
    LLAMA_3_2_1B,
    num_hidden_layers=2,
    hidden_size=128,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=1024,
)


@dataclass
class Plan:
    name: str
    shape: dict
    dtype: str
    requests: int  # (a)
    prompt_range: tuple[int, int]  # (a), [lo, hi)
    new_tokens: int  # (a)
    hf_requests: int  # (a), transformers side
    batch1_prompt: int  # (b) prompt length
    batch1_new: int  # (b)
    check_prompts: int
    check_prompt_range: tuple[int, int]
    check_new: int
    warm_requests: int
    warm_new_range: tuple[int, int]  # [lo, hi): varied, so batches shrink during warm-up
    max_num_seqs: int
    copy_bytes: int
    copy_reps: int


FULL = Plan(
    "Llama-3.2-1B shape",
    LLAMA_3_2_1B,
    "bfloat16",
    requests=256,
    prompt_range=(64, 512),
    new_tokens=128,
    hf_requests=64,
    batch1_prompt=128,
    batch1_new=256,
    check_prompts=8,
    check_prompt_range=(16, 128),
    check_new=32,
    warm_requests=16,
    warm_new_range=(2, 17),
    max_num_seqs=256,
    copy_bytes=1 << 30,
    copy_reps=20,
)
TINY_PLAN = Plan(
    "tiny (2 layers, hidden 128, vocab 1024)",
    TINY,
    "float32",
    requests=8,
    prompt_range=(8, 32),
    new_tokens=16,
    hf_requests=4,
    batch1_prompt=16,
    batch1_new=32,
    check_prompts=8,
    check_prompt_range=(4, 24),
    check_new=16,
    warm_requests=2,
    warm_new_range=(2, 6),
    max_num_seqs=8,
    copy_bytes=64 << 20,
    copy_reps=5,
)


def build_model(out: Path, plan: Plan, device: str, seed: int):
    """Seeded random Llama built on `device` in the plan's dtype, saved (safetensors) with the builtin
    tokenizer. Returns the in-memory transformers model (the peer; same tensors as the saved ones)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from optcli.checkpoints.resolve import resolve_model

    tok_dir = resolve_model("builtin:tiny-llama").path
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    tok_cfg = json.loads((tok_dir / "config.json").read_text())
    bos, eos = tok_cfg.get("bos_token_id", 1), tok_cfg.get("eos_token_id", 2)
    config = LlamaConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=0, **plan.shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, plan.dtype)).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(out)
    # The in-memory peer never stops on EOS (ours runs with ignore_eos): no eos in its generation config.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


# --- helpers the scripts share -----------------------------------------------------------------

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def timed_steps(eng, prompts: list[list[int]], new_tokens: int) -> dict:
    """Run the prompts to completion through `eng.step()` (EOS ignored) and time it: until every request has
    its first token, and the steps after. Prompt tok/s = prompt tokens / time to the last first token; decode
    tok/s = tokens of the steps after that / the time after it (None when there were none); `tokens`: all."""
    from optcli.engine import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for p in prompts:
        eng.add_request(p, params)
    firsts: set[str] = set()
    t_first = None
    total = after_first = 0  # after_first: tokens of the steps after every request had its first one
    while eng.has_unfinished():
        outs = eng.step()
        now = time.perf_counter()
        total += len(outs)
        if t_first is not None:
            after_first += len(outs)
            continue
        firsts.update(o.request_id for o in outs)
        if len(firsts) == len(prompts):
            t_first = now
    end = time.perf_counter()
    return {
        "prompt_tok_s": sum(map(len, prompts)) / (t_first - start),
        "decode_tok_s": after_first / (end - t_first) if after_first else None,
        "ttft_s": t_first - start,
        "decode_tokens": after_first,
        "tokens": total,
        "wall_s": end - start,
    }
