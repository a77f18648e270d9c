"""A quantized KV cache: K and V stored as FP8 (E4M3) or int8 with one scale per layer and KV head.

x ≈ q * scale, q = round(x / scale) saturated to the format's range. Scales come either from the artifact
(llm-compressor's calibrated `kv_cache_scheme`: per tensor or per head) or, without one, from the first K/V a
layer stores (the amax of that write per head, with headroom for larger later values). A scale never changes
once set, so every block (cached prefixes and recomputed, preempted sequences included) is read back with the
scale it was written with. One scale per KV head lets both attention paths keep the math exact: K's scale
folds into the query (q·(k*s) = (q*s)·k) and V's into the output, so a kernel only converts the 8-bit values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optcli.engine.kernels.kv_rounding import QMAX, as_bytes, quantize

STORAGE = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
# Dynamic scales: the first write's amax maps to QMAX / headroom. FP8 is floating point, so headroom costs it
# nothing but range at the small end (values 2**-9 * scale and below flush), while a later value above the
# first write's amax would saturate: 4x room. int8 steps are uniform, so headroom costs resolution directly;
# 1.25x keeps moderate growth unclipped at a quarter of a bit.
HEADROOM = {torch.float8_e4m3fn: 4.0, torch.int8: 1.25}


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype the cache is allocated in."""
    if kv_cache_dtype in STORAGE:
        return STORAGE[kv_cache_dtype]
    return model_dtype if kv_cache_dtype == "auto" else getattr(torch, kv_cache_dtype)


def is_quantized_dtype(dtype: torch.dtype) -> bool:
    return dtype in QMAX


@dataclass
class KVScales:
    """One layer's scales, [KV heads] fp32 each. `calibrated`: read from the artifact; else dynamic, set by the
    layer's first write (0 = not set yet). `ready` is the host's copy of "set", so the CPU path checks once."""

    k: torch.Tensor
    v: torch.Tensor
    calibrated: bool = False
    ready: bool = False

    @classmethod
    def unset(cls, kv_heads: int, device) -> KVScales:
        zeros = torch.zeros(kv_heads, dtype=torch.float32, device=device)
        return cls(zeros, zeros.clone())

    def reset(self) -> None:
        """Forget dynamic scales in place (CUDA graphs keep pointing at the same tensors): after a warm-up or
        graph capture wrote dummy K/V, the first real write sets them."""
        if not self.calibrated:
            self.k.zero_()
            self.v.zero_()
            self.ready = False


class QuantKVCache(tuple):
    """A layer's (k_cache, v_cache) in an 8-bit dtype plus its KVScales at index 2: code that unpacks [0] and
    [1] keeps working, and `quant_scales(cache)` tells the paths a cache needs quantizing."""

    def __new__(cls, k_cache: torch.Tensor, v_cache: torch.Tensor, scales: KVScales):
        return super().__new__(cls, (k_cache, v_cache, scales))


def quant_scales(kv_cache) -> KVScales | None:
    return kv_cache[2] if len(kv_cache) > 2 else None


def dynamic_scale(x: torch.Tensor, live: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Per-head scale [KV] from x [T, KV, D] (rows where `live` is False, i.e. padding, ignored)."""
    amax = x.detach().abs().float().amax(dim=2)
    if live is not None:
        amax = amax * live[:, None]
    return amax.amax(dim=0) * (HEADROOM[dtype] / QMAX[dtype])


def ensure_scales(scales: KVScales, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype,
                  live: torch.Tensor | None = None, on_device: bool = False) -> None:
    """Set a dynamic layer's scales from this write if they are not set yet. `on_device`: decide on the device
    (no host sync, so a CUDA graph can capture it); else once, by the host flag."""
    if scales.calibrated or k.shape[0] == 0 or (scales.ready and not on_device):
        return
    for have, x in ((scales.k, k), (scales.v, v)):
        new = dynamic_scale(x, live, dtype)
        have.copy_(torch.where(have > 0, have, new))
    if not on_device:
        scales.ready = bool((scales.k > 0).all() and (scales.v > 0).all())


def store_quantized(k, v, k_cache, v_cache, slots: torch.Tensor, scales: KVScales) -> None:
    """The CPU path's store: quantize this step's K/V rows into their slots (all slots are live here)."""
    dtype = k_cache.dtype
    ensure_scales(scales, k, v, dtype)
    as_bytes(k_cache).index_copy_(0, slots, as_bytes(quantize(k, scales.k, dtype)))
    as_bytes(v_cache).index_copy_(0, slots, as_bytes(quantize(v, scales.v, dtype)))


def head_scale(scale: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A [KV] scale repeated for each query head of its group: [H]."""
    return scale.repeat_interleave(num_heads // scale.shape[0])
