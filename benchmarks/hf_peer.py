"""gpu_check.py's peer: transformers `generate` (batch 1) and `generate_batch` (continuous batching, warmed and timed
as the docstring of gpu_check.py says).
"""

from __future__ import annotations

import math
import time

import torch
from bench_model import sync


def hf_generate(model, device: str, prompt: list[int], new_tokens: int, with_logits: bool = False):
    """transformers `generate`, batch 1, greedy, EOS disabled. Returns (wall s, tokens, per-step logits or None)."""
    ids = torch.tensor([prompt], device=device)
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        output_logits=with_logits,
        return_dict_in_generate=with_logits,
    )
    sync(device)
    wall = time.perf_counter() - t0
    seq = out.sequences if with_logits else out
    tokens = seq[0, len(prompt) :].tolist()
    if len(tokens) != new_tokens:
        raise RuntimeError(f"transformers generate returned {len(tokens)} tokens for {new_tokens}")
    logits = [step[0].float().cpu() for step in out.logits] if with_logits else None
    return wall, tokens, logits


def hf_cb_config(device: str, num_requests: int, max_len: int):
    """Defaults on the GPU (transformers sizes its cache from free memory); on CPU the cache is sized
    explicitly, since transformers would otherwise take 90% of the host's RAM."""
    from transformers import ContinuousBatchingConfig

    if device.startswith("cuda"):
        return ContinuousBatchingConfig()
    block = 256
    return ContinuousBatchingConfig(
        block_size=block, num_blocks=num_requests * (math.ceil(max_len / block) + 1), max_batch_tokens=2048
    )


def hf_generate_batch(model, device: str, prompts, new_tokens: int, warm_prompts, warm_new: list[int]):
    """transformers `generate_batch`, timed after a warm-up on the very manager it will use.

    `generate_batch` sizes a fresh manager from its inputs (WorkloadHints: longest prompt,
    max_new_tokens, request count; max_requests_per_batch = min(requests, 1024)) and, when one is
    cached on the model, reuses that instead. So the warm-up builds a manager with the timed call's
    own hints, warms it (`warmup()`: CUDA-graph capture where transformers uses graphs), runs the
    warm-up requests through it and keeps it cached (`stop(keep_for_next_session=True)`); the timed
    `generate_batch` then finds it warmed (skips `warmup()`), runs, and destroys it."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0)
    longest = max(len(p) for p in prompts)
    hints = WorkloadHints(max_prompt_length=longest, max_generated_length=new_tokens, num_requests=len(prompts))
    cb_cfg = hf_cb_config(
        device, max(len(prompts), len(warm_prompts)), max(longest, *map(len, warm_prompts)) + new_tokens
    )
    manager = model.init_continuous_batching(
        generation_config=gen_cfg, continuous_batching_config=cb_cfg, workload_hints=hints
    )
    attn_in_cb = model.config._attn_implementation  # what CB switched to (stop() restores the original)
    manager.warmup()
    manager.start()
    ok = False
    try:
        for k, (p, n) in enumerate(zip(warm_prompts, warm_new, strict=True)):
            if manager.add_request(p, request_id=f"warm-{k}", max_new_tokens=n, eos_token_id=-1) is None:
                raise RuntimeError("transformers CB refused a warm-up request")
        done = 0
        while done < len(warm_prompts):
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("transformers CB loop stopped during warm-up")
                continue
            if res.is_finished():
                if res.error is not None:
                    raise RuntimeError(f"transformers CB warm-up request failed: {res.error}")
                done += 1
        ok = True
    finally:
        manager.stop(block=True, timeout=60, keep_for_next_session=ok, hard_stop=not ok)
        if not ok:
            manager.destroy()
    if getattr(model, "_cached_continuous_batching_manager", None) is not manager:
        raise RuntimeError("the warmed-up transformers CB manager was not cached for generate_batch to reuse")
    cfg = manager.continuous_batching_config
    info = (
        f"attn {attn_in_cb}, cuda graphs {cfg.use_cuda_graph}, async {cfg.use_async_batching}, "
        f"blocks {cfg.num_blocks}x{cfg.block_size}, max_batch_tokens {cfg.max_batch_tokens}, "
        f"max_requests_per_batch {cfg.max_requests_per_batch}"
    )
    try:
        sync(device)
        t0 = time.perf_counter()
        results = model.generate_batch(prompts, generation_config=gen_cfg, max_new_tokens=new_tokens)
        sync(device)
        wall = time.perf_counter() - t0
    finally:
        model.destroy_cached_continuous_batching_manager()
    # generate_batch logs failures and returns what finished: check every request came back whole.
    outs = list(results.values())
    if len(outs) != len(prompts) or any(o.error is not None for o in outs):
        raise RuntimeError(f"transformers generate_batch returned {len(outs)} of {len(prompts)} requests (or errors)")
    tokens = [list(o.generated_tokens) for o in outs]
    if any(len(t) != new_tokens for t in tokens):
        raise RuntimeError("transformers generate_batch returned a request of the wrong length")
    # Each result carries its finish time (perf_counter, stamped once its last token is on the host):
    # the call minus its teardown (stop(): thread join, gc.collect), which costs ~0.4 s per call.
    to_last = max(o.lifespan[1] for o in outs) - t0
    return wall, to_last, tokens, info
