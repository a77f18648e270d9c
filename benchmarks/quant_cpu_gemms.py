"""quant_cpu.py's GEMM table: the four matmul modules of layer 0 (or a MoE layer's attention and expert 0) and the LM
head, timed on random inputs, best of a few calls.
"""

from __future__ import annotations

import time

import torch

GEMM_ROWS = (1, 16, 64)


def layer0_gemms(model) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, module, input width) of layer 0's matmuls: qkv, o and the MLP's gate_up and down, or in a MoE
    layer (which has no gate_up_proj / down_proj) expert 0's. The widths come from the config, as a packed
    quantized layer keeps no [out, in] weight to read them from."""
    cfg, layer = model.cfg, model.layers[0]
    attn = [("qkv_proj", layer.qkv_proj, cfg.hidden_size), ("o_proj", layer.o_proj, cfg.num_heads * cfg.head_dim)]
    if layer.moe is not None:
        return attn + [("expert 0 gate_up", layer.moe.gate_up[0], cfg.hidden_size),
                       ("expert 0 down", layer.moe.down[0], cfg.moe.expert_intermediate_size)]
    return attn + [("gate_up_proj", layer.gate_up_proj, cfg.hidden_size),
                   ("down_proj", layer.down_proj, cfg.intermediate_size)]


@torch.inference_mode()
def best_us(module, x: torch.Tensor, reps: int = 5) -> float:
    module(x)
    module(x)  # warm-up: first calls pay for kernel selection and packing
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        module(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def gemm_times(eng) -> dict:
    """µs of layer 0's four matmuls (`layer0_gemms`) summed, by rows M, and of the LM head at M = 1."""
    model, dtype = eng.model, getattr(torch, eng.config.dtype)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for m in GEMM_ROWS:
        total = 0.0
        for _, module, width in layer0_gemms(model):
            x = (torch.randn(m, width, generator=gen) * 0.5).to(dtype)
            total += best_us(module, x)
        out[f"layer M={m}"] = total
    x = (torch.randn(1, model.cfg.hidden_size, generator=gen) * 0.5).to(dtype)
    out["lm_head M=1"] = best_us(model.lm_head, x)
    return out
