"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_args(dtype: torch.dtype) -> dict:
    """Constexpr kwargs steering tl.dot for inputs of `dtype`.

    fp32 inputs use exact ("ieee") products rather than TF32, so fp32 caches keep fp32 accuracy.
    The interpreter's tl.dot multiplies bf16 operands as their raw uint16 bit patterns (triton
    3.9), so there the operands are upcast to fp32 first; compiled kernels keep bf16 tensor-core dots.
    """
    return {
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST_DOT": dtype == torch.bfloat16 and interpreting(),
    }
