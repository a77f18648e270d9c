"""The decoder layer's elementwise work as one launch each: residual add + RMSNorm, RoPE (+ KV-cache store),
SiLU-and-mul (or Gemma's GELU-tanh-and-mul).

Written as torch ops, a layer's norms, rotary embedding and MLP activation are ~25 small kernels; in a
batch-1 decode step each costs microseconds however little it computes. Fused, a whole layer is 9
launches instead of 35 (counted by `benchmarks/decode_ops.py`).

Numerics follow transformers op for op, rounding to the activation dtype wherever its bf16 ops
round (the norm's scaled row before the weight, each RoPE product, the SiLU before the multiply),
so a fused step gives the unfused step's values; only the order of the fp32 sum of squares differs.
Rounding to bf16 is done by hand (`rounding.round_to`), so the interpreter tests check the numerics
the GPU runs.
`optcli/engine/models/layer_ops.py` holds both sets (torch for CPU, these for the Triton backend).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optcli.engine.kernels.quant_reference import QuantizedInput

from .act_quant import quant_constants, quantize_values
from .rounding import round_to


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, q_ptr, scale_ptr, N, eps,
                     stride_x, stride_r, stride_o, stride_ro, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     FP32_WEIGHT: tl.constexpr, QUANT: tl.constexpr, DIVISOR: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                     IS_INT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # the residual stream moves on first: x + residual, rounded as torch's add
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = round_to(x.to(tl.float32) + r.to(tl.float32), res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x.to(res_out_ptr.dtype.element_ty), mask=mask)
    dtype = x_ptr.dtype.element_ty  # the activations' dtype (out_ptr holds int8/FP8 when QUANT)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if FP32_WEIGHT:  # Gemma's (1 + w): the fp32 row times the weight, rounded once (TorchOps.rms_norm)
        y = round_to(w * (xf * rstd), dtype)
    else:
        y = round_to(w * round_to(xf * rstd, dtype), dtype)
    if QUANT:  # the next layer's per-token int8/FP8 input, instead of the normed row itself
        _store_quantized(y, q_ptr + row * stride_o + cols, scale_ptr + row, mask, DIVISOR, QMIN, QMAX, IS_INT)
    else:
        tl.store(out_ptr + row * stride_o + cols, y.to(dtype), mask=mask)


@triton.jit
def _store_quantized(y, q_ptrs, scale_ptr, mask, DIVISOR: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                     IS_INT: tl.constexpr):
    """A whole row quantized per token, as act_quant.quantize_per_token would from the stored row."""
    scale = tl.maximum(tl.max(tl.abs(y), axis=0) / DIVISOR, 1e-12)
    tl.store(scale_ptr, scale)
    tl.store(q_ptrs, quantize_values(y, scale, QMIN, QMAX, IS_INT).to(q_ptrs.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             quant: torch.dtype | None = None) -> tuple[torch.Tensor | QuantizedInput, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) for x [T, N]; without a residual, (RMSNorm(x), x).
    With `quant` (int8 or float8_e4m3fn) the normed rows come back quantized per token instead."""
    assert x.dim() == 2 and x.stride(1) == 1 and weight.is_contiguous()
    t, n = x.shape
    out = torch.empty((t, n), dtype=quant or x.dtype, device=x.device)
    scales = torch.empty((t, 1), dtype=torch.float32, device=x.device) if quant else out
    res_out = torch.empty_like(x) if residual is not None else x
    if t:
        res = residual if residual is not None else x
        _rms_norm_kernel[(t,)](
            x, res, weight, out, res_out, out, scales, n, eps,
            x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
            FP32_WEIGHT=weight.dtype == torch.float32 and x.dtype != torch.float32, QUANT=quant is not None,
            **quant_constants(quant or torch.int8),
        )  # fmt: skip
    return (QuantizedInput(out, scales, x.dtype) if quant else out), res_out


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_vt, stride_vh, stride_cs, stride_ch,
                   NUM_Q: tl.constexpr, NUM_K: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr, STORE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    heads = tl.arange(0, BLOCK_H)[:, None]
    d_mask = d < HALF
    # cos/sin rows repeat their halves (transformers' cat(freqs, freqs)); both halves are read as it does.
    cos1 = tl.load(cos_ptr + t * stride_ct + d, mask=d_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + t * stride_ct + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * stride_ct + d, mask=d_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * stride_ct + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    if STORE:  # padded tokens (slot < 0) write nothing; `tile_mask & scalar` trips the interpreter (store_kv.py)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        live_k = tl.where(slot >= 0, NUM_K, 0)
    for which in tl.static_range(2):
        if which == 0:
            base, stride_t, stride_h, num = q_ptr, stride_qt, stride_qh, NUM_Q
        else:
            base, stride_t, stride_h, num = k_ptr, stride_kt, stride_kh, NUM_K
        dtype = base.dtype.element_ty
        mask = (heads < num) & d_mask
        ptr = base + t * stride_t + heads * stride_h + d
        x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product rounded to the activation dtype first.
        lo = round_to(round_to(x1 * cos1, dtype) - round_to(x2 * sin1, dtype), dtype)
        hi = round_to(round_to(x2 * cos2, dtype) + round_to(x1 * sin2, dtype), dtype)
        if which == 1 and STORE:  # rotated K goes straight to its cache slot: attention reads K from there
            out, mask = k_cache_ptr + slot * stride_cs + heads * stride_ch + d, (heads < live_k) & d_mask
        else:
            out = ptr
        tl.store(out, lo.to(out.dtype.element_ty), mask=mask)
        tl.store(out + HALF, hi.to(out.dtype.element_ty), mask=mask)
    if STORE:  # V unrotated, both halves
        mask = (heads < live_k) & d_mask
        v_src = v_ptr + t * stride_vt + heads * stride_vh + d
        v_dst = v_cache_ptr + slot * stride_cs + heads * stride_ch + d
        tl.store(v_dst, tl.load(v_src, mask=mask), mask=mask)
        tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=mask), mask=mask)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """Rotate q [T, H, D] and k [T, KV, D] in place (any row/head strides, unit stride within a head)
    by cos/sin [T, D] (half-split layout, as transformers). With `store` = (v, k_cache, v_cache,
    slot_mapping), rotated K and V are written to their cache slots instead (slots < 0 skipped),
    which replaces store_kv; `k` itself is then left unrotated."""
    t, num_q, dim = q.shape
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride() == sin.stride() and cos.stride(1) == 1
    if store is not None:
        v, k_cache, v_cache, slots = store
        assert v.stride(2) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(2) == 1
        assert k_cache.shape[1:] == k.shape[1:] and slots.shape == (t,)
    else:
        v, k_cache, v_cache, slots = k, k, k, k  # unused
    if t:
        _rotary_kernel[(t,)](
            q, k, cos, sin, v, k_cache, v_cache, slots,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1),
            NUM_Q=num_q, NUM_K=k.shape[1], HALF=dim // 2,
            BLOCK_H=triton.next_power_of_2(max(num_q, k.shape[1])), BLOCK_D=triton.next_power_of_2(dim // 2),
            STORE=store is not None,
        )  # fmt: skip


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, N, stride_x, stride_o, BLOCK: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    dtype = out_ptr.dtype.element_ty
    y = _silu_mul_values(x_ptr + row * stride_x, cols, N, dtype, GELU)
    tl.store(out_ptr + row * stride_o + cols, y.to(dtype), mask=cols < N)


@triton.jit
def _silu_mul_quant_kernel(x_ptr, q_ptr, scale_ptr, N, stride_x, stride_q, BLOCK: tl.constexpr, GELU: tl.constexpr,
                           DIVISOR: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """One program per row: the row's absmax first, then the quantized row (SiLU recomputed, not stored)."""
    row = tl.program_id(0).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        absmax = tl.maximum(absmax, tl.abs(_silu_mul_values(x_ptr + row * stride_x, cols, N, dtype, GELU)))
    scale = tl.maximum(tl.max(absmax, axis=0) / DIVISOR, 1e-12)
    tl.store(scale_ptr + row, scale)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        y = quantize_values(_silu_mul_values(x_ptr + row * stride_x, cols, N, dtype, GELU), scale, QMIN, QMAX,
                            IS_INT)
        tl.store(q_ptr + row * stride_q + cols, y.to(q_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def _silu_mul_values(row_ptr, cols, N, dtype: tl.constexpr, GELU: tl.constexpr):
    mask = cols < N
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row_ptr + N + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:  # tanh-approximate GELU: 0.5 x (1 + tanh(z)) = x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3)
        z2 = 1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)
        act = gate * tl.sigmoid(tl.minimum(tl.maximum(z2, -80.0), 80.0))  # clamped: exp stays finite
    else:
        act = gate / (1.0 + tl.exp(-gate))
    return round_to(round_to(act, dtype) * up, dtype)


def silu_mul(gate_up: torch.Tensor, block: int = 1024, quant: torch.dtype | None = None,
             act: str = "silu") -> torch.Tensor | QuantizedInput:
    """act(gate) * up for gate_up [T, 2I] (gate first, as the fused gate_up projection) -> [T, I], act
    "silu" or "gelu_tanh"; with `quant` (int8 or float8_e4m3fn), quantized per token for the next layer instead."""
    assert act in ("silu", "gelu_tanh"), act
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((t, n), dtype=quant or gate_up.dtype, device=gate_up.device)
    block = min(block, triton.next_power_of_2(n))
    if quant:
        scales = torch.empty((t, 1), dtype=torch.float32, device=gate_up.device)
        if t:
            _silu_mul_quant_kernel[(t,)](gate_up, out, scales, n, gate_up.stride(0), out.stride(0), BLOCK=block,
                                         GELU=act == "gelu_tanh", **quant_constants(quant))
        return QuantizedInput(out, scales, gate_up.dtype)
    if t:
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=block,
                                                     GELU=act == "gelu_tanh")
    return out
