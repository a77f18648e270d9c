"""A quantized KV cache: K and V stored as FP8 (E4M3) or int8 with scales [KV heads, head dim] per layer.

x ≈ q * scale, q = round(x / scale) saturated to the format's range. Scales come either from the artifact
(llm-compressor's calibrated `kv_cache_scheme`: per tensor or per head, repeated over the channels) or, without
one, from the first K/V a layer stores, with headroom for larger later values: for int8, K per RoPE channel pair
(the pair's norm, which the position's rotation leaves alone, so the first tokens bound later ones; per channel,
a 32-token first write clipped later keys and cost KLD 0.9 on stories260K), else per head (HEADROOM below). Nothing changes once set,
so every block (cached prefixes and the recomputed blocks of a preempted sequence included) is read with the
scales that wrote it.

A scale per channel costs nothing at read time: K's folds into the query (sum_d q_d (k_d s_d) = sum_d (q_d s_d)
k_d) and V's into the output (the softmax weights sum over tokens, not channels), so the attention paths only
widen the 8-bit values and the store does the rest. Measured on stories260K (int8): per-pair K scales took KLD
against a bf16 cache from 0.012 to 0.009; per-channel V scales and centring K (its mean is not stationary under
RoPE) did not help, nor would finer scales help FP8 (3 mantissa bits: ~2.6% error per element at any scale).
What does: K's error is almost all of the cost (V alone: KLD 0.001), and stories260K's slowest RoPE pair carries a
large mean (|mean| 7-18 against a std of 2-4) that rotates 0.001 rad a token, so a fixed (softmax-invariant) shift
cannot remove it; subtracting the pre-RoPE mean before rotation and adding it back rotated at read time does
(kv_centre.py, both attention paths): int8 0.0108 / 0.945 -> 0.0052 / 0.961, FP8 0.029 / 0.906 -> 0.0056 / 0.961
(decode KLD / top-1 against a bf16 cache, bf16 engine), with K then scaled per pair for both formats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from optcli.engine.kernels import cpu_kv8
from optcli.engine.kernels.kv_rounding import QMAX, as_bytes, quantize

STORAGE = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
# Dynamic scales: the first write's amax maps to QMAX / headroom. FP8 is floating point: its rounding error is
# relative, so finer scales buy it nothing and headroom costs only range at the small end (values 2**-9 * scale
# and below flush), while a later value above the first write's amax would saturate: per head, 4x room. int8
# steps are uniform, so headroom costs resolution directly: V per head with 1.25x; K per RoPE pair with 1.5x,
# but never below 0.75x its head's amax (a pair the first tokens barely used must still hold later ones).
# Chosen on K captured from 512 held-out tokens, scales from the first 32 (relative int8 error, stories260K /
# tiny-llama): per head 1.25x 0.0103 / 0.0105; per pair 1.25x 0.0075 / 0.0182 (clips); this rule 0.0079 / 0.0099.
HEADROOM = {torch.float8_e4m3fn: 4.0, torch.int8: 1.25}
PAIR_HEADROOM = {torch.int8: (1.5, 0.75)}  # K: (x the pair's amax, at least x the head's amax)
# With K centred (kv_centre.py), K per pair for both formats: once the mean is gone, a pair's range is what is left;
# 2.5x its first write's amax (FP8 at least 0.75x the head's). Chosen on stories260K and tiny-llama, engine dtype
# bf16 and fp32, decode and chunked-prefill KLD / top-1 against a bf16 cache (worst of the eight; tiny-llama's
# decode KLD): int8 2x 0.0046 / 0.953 (0.0034), 2.5x 0.0069 / 0.959 (0.0004), 3x 0.0096 / 0.948; FP8 2x + 0.75
# floor 0.0064 / 0.952 (0.0031), 2.5x + 0.75 0.0064 / 0.953 (0.0007), 3x + 0.75 0.0067 / 0.940. 2x likely clips later
# keys of tiny-llama (8x its KLD); the top-1 margins are a few tokens of 255 (stories260K's near-ties).
CENTRED_PAIR_HEADROOM = {torch.int8: (2.5, 0.0), torch.float8_e4m3fn: (2.5, 0.75)}


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype the cache is allocated in."""
    if kv_cache_dtype in STORAGE:
        return STORAGE[kv_cache_dtype]
    return model_dtype if kv_cache_dtype == "auto" else getattr(torch, kv_cache_dtype)


def is_quantized_dtype(dtype: torch.dtype) -> bool:
    return dtype in QMAX


@dataclass
class KVScales:
    """One layer's scales [KV, D] fp32 for K and V. `calibrated`: read from the artifact;
    else dynamic, set by the layer's first write (0 = not set yet). `ready` is the host's copy of "set", so the
    CPU path checks it once; the Triton path decides on the device (CUDA graphs). `centre` [KV, D] fp32: the
    pre-RoPE mean key subtracted before quantizing (kv_centre.py), used where `rope` (the layer's
    positions -> (cos, sin)) is attached; set by the first write even with calibrated scales."""

    k: torch.Tensor
    v: torch.Tensor
    calibrated: bool = False
    ready: bool = False
    centre: torch.Tensor | None = None
    centre_ready: bool = False
    rope: Callable | None = None
    coef: torch.Tensor | None = None  # [2, KV, D]: the CPU read's rope_p(c) / k scale coefficients (kv_centre.py)
    centre_set: torch.Tensor | None = None  # [1] fp32, 1 once the centre is set: the device's copy of centre_ready

    def __post_init__(self) -> None:
        if self.centre is None:
            self.centre = torch.zeros_like(self.k)
        if self.centre_set is None:
            self.centre_set = torch.zeros(1, dtype=torch.float32, device=self.k.device)

    @classmethod
    def unset(cls, kv_heads: int, head_dim: int, device) -> KVScales:
        zeros = torch.zeros(kv_heads, head_dim, dtype=torch.float32, device=device)
        return cls(zeros, zeros.clone())

    def reset(self) -> None:
        """Forget dynamic scales and the centre in place (CUDA graphs keep pointing at the same tensors): after
        a warm-up or graph capture wrote dummy K/V, the first real write sets them."""
        self.centre.zero_()
        self.centre_set.zero_()
        self.centre_ready = False
        self.coef = None
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


def _first_write(x: torch.Tensor, live: torch.Tensor | None, dtype: torch.dtype, pairs: bool, centred: bool = False):
    """Scale [KV, D] from x [T, KV, D] (rows where `live` is False, i.e. padding, ignored). `pairs` (K, int8): per
    RoPE pair (channels d and d + D/2), from the pair's norm, which rotation by position does not change, so the
    first tokens bound the later ones (a single channel's range moves with the position); else per head."""
    x = x.detach().float()
    if live is not None:
        x = x * live[:, None, None]
    head = x.abs().amax(dim=(0, 2)).clamp_min(1e-6)[:, None].expand(-1, x.shape[-1])  # [KV, D]
    half = x.shape[-1] // 2
    rules = CENTRED_PAIR_HEADROOM if centred else PAIR_HEADROOM
    if not (pairs and dtype in rules and x.shape[-1] % 2 == 0):
        return head * (HEADROOM[dtype] / QMAX[dtype])
    pair_room, head_room = rules[dtype]
    norm = torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2).amax(dim=0)  # [KV, D/2]
    return torch.maximum(torch.cat([norm, norm], dim=-1) * pair_room, head * head_room) / QMAX[dtype]


def ensure_scales(scales: KVScales, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype,
                  live: torch.Tensor | None = None, on_device: bool = False) -> None:
    """Set a dynamic layer's scales from this write if they are not set yet. `on_device`: decide on the device
    (no host sync, so a CUDA graph can capture it); else once, by the host flag."""
    if scales.calibrated or k.shape[0] == 0 or (scales.ready and not on_device):
        return
    centred = scales.centre_ready or (on_device and scales.rope is not None)
    k_scale = _first_write(k, live, dtype, pairs=True, centred=centred)
    v_scale = _first_write(v, live, dtype, pairs=False)
    unset = scales.k[:1, :1] == 0  # [1, 1]: all of a layer's scales are set together
    if live is not None:
        unset = unset & live.any()  # an all-padding step (a graph replay's filler) sets nothing
    for have, new in ((scales.k, k_scale), (scales.v, v_scale)):
        have.copy_(torch.where(unset, new, have))
    if not on_device:
        scales.ready = True


def store_quantized(k, v, k_cache, v_cache, slots: torch.Tensor, scales: KVScales) -> None:
    """The CPU path's store: quantize this step's K/V rows into their slots (all slots are live here)."""
    dtype = k_cache.dtype
    ensure_scales(scales, k, v, dtype)
    if cpu_kv8.store(k, k_cache, slots, scales.k) and cpu_kv8.store(v, v_cache, slots, scales.v):
        return  # our AVX2 kernel, code for code the statement below
    as_bytes(k_cache).index_copy_(0, slots, as_bytes(quantize(k, scales.k, dtype)))
    as_bytes(v_cache).index_copy_(0, slots, as_bytes(quantize(v, scales.v, dtype)))


def head_scale(scale: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A [KV, D] scale repeated for each query head of its group: [H, D]."""
    return scale.repeat_interleave(num_heads // scale.shape[0], dim=0)
