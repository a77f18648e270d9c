"""Centring K before RoPE for an 8-bit KV cache: store rope_p(k - c) quantized, add rope_p(c) back at read.

Why: K's rounding is almost all of an 8-bit cache's accuracy cost, and a model's slowest RoPE pair can carry a
mean far above its spread (stories260K: |mean| 7-18 against a std of 2-4) on exactly the channels the queries
weight most. The mean rotates with the position, so a fixed (softmax-invariant) shift after RoPE cannot remove it;
subtracting the pre-RoPE mean c before rotation (rope is linear: rope_p(k) - rope_p(c) = rope_p(k - c)) removes it
at every position, and the read adds rope_p(c) back exactly. Measured on stories260K against a bf16 cache: see
kv_quant.py.

c is one layer's mean pre-RoPE key [KV, D] over its first write (like dynamic scales, fixed once set, so every
block is read with the centre that wrote it); an artifact's calibrated scales do not carry one, so it is computed
at first write there too. Centring is on where the engine attached the layer's RoPE table to its KVScales
(`rope`: positions -> (cos, sin), the same cos/sin the layer rotates with); off (c unused) otherwise.

The read: the CPU path adds rope_p(c) / k_scale (in code units, since K's scale folds into the queries) to each
key as it reads it, in a decode step's attention kernel (cpu_kv8.decode_attention) or a prefill chunk's gather
(cpu_kv8.gather_widen), computed there from two [KV, D] coefficients and the cos|sin rows shared by all layers
(a per-layer table of rope_p(c) by position was as many bytes as one sequence's bf16 K: at batch 1 it ate the
memory the 8-bit cache saves); the Triton kernels do the same per key tile from the layer's cos|sin table
(kernels/online_softmax.py: centre_coeffs, add_centre), so neither path's memory grows per layer with the
context. The price on CPU: 2 multiply-adds per cached K element in the kernel's register pass.
"""

from __future__ import annotations

import weakref

import torch

from optcli.engine.attention.rope import apply_rotary, rotate_half


def ensure_centre(scales, k: torch.Tensor, live: torch.Tensor | None = None, on_device: bool = False) -> None:
    """Set the layer's centre from this write's pre-RoPE keys k [T, KV, D] (rows where `live` is False, i.e.
    padding, ignored) if it is not set yet. `on_device`: decided on the device by `centre_set` (no host sync, so
    a CUDA graph can capture it, as kv_quant.ensure_scales); else once, by the host flag."""
    if scales.rope is None or k.shape[0] == 0 or (scales.centre_ready and not on_device):
        return
    x = k.detach().float()
    if not on_device:
        scales.centre.copy_(x.mean(dim=0))
        scales.centre_set.fill_(1.0)
        scales.centre_ready, scales.coef = True, None
        return
    weight = live.float() if live is not None else torch.ones(x.shape[0], device=x.device)
    mean = (x * weight[:, None, None]).sum(dim=0) / weight.sum().clamp_min(1.0)
    unset = scales.centre_set == 0  # [1]
    if live is not None:
        unset = unset & live.any()  # an all-padding step (a graph replay's filler) sets nothing
    scales.centre.copy_(torch.where(unset, mean, scales.centre))
    scales.centre_set.copy_(torch.where(unset, torch.ones_like(scales.centre_set), scales.centre_set))


def rotated_centre(scales, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rope_p(c) at a step's positions: [T, KV, D], from the layer's own cos/sin [T, D]."""
    c = scales.centre.to(dtype)[None].expand(cos.shape[0], -1, -1)
    return apply_rotary(c, cos, sin)


def centre_keys(scales, k_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                on_device: bool = False) -> torch.Tensor:
    """The post-RoPE keys the cache stores: rope_p(k) - rope_p(c) (k_rot unchanged where centring is off).
    `on_device`: subtract whatever the centre holds (0 until set, and set before this by ensure_centre)."""
    if scales is None or scales.rope is None or not (scales.centre_ready or on_device):
        return k_rot
    return k_rot - rotated_centre(scales, cos.float(), sin.float(), torch.float32).to(k_rot.dtype)


def centre_read(scales, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What the CPU read needs to add rope_p(c) / k_scale back for key positions 0..length-1, in code units (K's
    scale folds into the queries): (cos|sin rows [>= length, 2D] fp32, rounded as the layer's own cos/sin, shared
    by the layers of one RoPE kind; coef [2, KV, D] fp32: (a, b) with rope_p(c)_d / s_d = a_d cos_p,d +
    b_d sin_p,d). None where centring is off."""
    if scales.rope is None or not scales.centre_ready:
        return None
    if scales.coef is None:
        safe = torch.where(scales.k > 0, scales.k, torch.ones_like(scales.k))  # 0 = unset scale, read as 1
        partner = rotate_half(scales.centre)
        scales.coef = torch.stack([scales.centre / safe, partner / safe]).contiguous()
    return rope_rows(scales.rope, length, dtype), scales.coef


_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # rope -> {dtype: rows}


def rope_rows(rope, length: int, dtype: torch.dtype) -> torch.Tensor:
    """cos|sin [>= length, 2D] fp32 of `rope` at positions 0.., rounded to `dtype` first (the model casts its
    cos/sin to the activation dtype, so the read adds back exactly what the store took away). Built once per
    RoPE kind and grown by doubling: at 2k context and head dim 64, 1 MiB for all layers."""
    by_dtype = _ROWS.setdefault(rope, {})
    rows = by_dtype.get(dtype)
    if rows is None or rows.shape[0] < length:
        size = max(length, 2 * rows.shape[0] if rows is not None else 0)
        cos, sin = rope(torch.arange(size))
        rows = by_dtype[dtype] = torch.cat([cos.to(dtype).float(), sin.to(dtype).float()], dim=-1).contiguous()
    return rows
