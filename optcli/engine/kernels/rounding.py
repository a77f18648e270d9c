"""Rounding fp32 to a narrower float's grid inside Triton kernels, the same on a GPU and on the CPU interpreter.

Triton's CPU interpreter (triton 3.9) truncates fp32 -> bf16 casts where the GPU rounds half to even,
so a kernel that rounds by hand computes identical values in both places, and the interpreter tests
check the numerics the GPU runs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x rounded to `dtype`'s grid (still fp32), half to even, as torch's casts round."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float32:
        return x
    else:
        return x.to(dtype).to(tl.float32)
