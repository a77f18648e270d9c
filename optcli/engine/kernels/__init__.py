"""Triton kernels for the paged KV cache: store new K/V, decode attention, ragged prefill attention.

Triton is optional (the CPU build of torch does not ship it), so this package imports without it;
check triton_available() before calling the kernels. Each module also holds a plain-PyTorch
reference of its kernel. TRITON_INTERPRET=1 must be set before this package is first imported for
the kernels to run on the CPU interpreter: triton.jit picks interpreted vs compiled at decoration.

The CPU rooms: `cpu_lowbit` (AVX2 C kernels) and `cpu_amx` (AMX and AVX-512 VNNI C kernels) for the linear
layers, both built on first use by `cpu_build` (see their docstrings), each with a plain-PyTorch statement of what it computes; `cpu_caps`
(the CPU's flags from `cpu_flags`, which the kernel rules read) and `cpu_threads` (the thread count, from the free cores).
"""

from __future__ import annotations

import torch

from ._utils import interpreting

__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kv", "triton_available"]

try:
    import triton  # noqa: F401

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False

if _HAS_TRITON:
    from .decode_attention import paged_decode_attention
    from .prefill_attention import paged_prefill_attention
    from .store_kv import store_kv
else:

    def _missing(*args, **kwargs):
        raise RuntimeError("optcli.engine.kernels needs the `triton` package")

    paged_decode_attention = paged_prefill_attention = store_kv = _missing


def triton_available() -> bool:
    """True when the kernels can run here: triton is installed and there is a CUDA device or the
    CPU interpreter (TRITON_INTERPRET=1) is enabled."""
    return _HAS_TRITON and (torch.cuda.is_available() or interpreting())
