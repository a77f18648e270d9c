"""The decoder layer's non-GEMM math, in three interchangeable sets with the same numerics.

`TorchOps` is plain PyTorch, op for op as transformers computes it (the reference, and the CPU path where the
activations are not fp32). `CpuOps` runs fp32 norms, RoPE and SiLU-mul through one C call each
(`kernels/cpu_layer_ops.py`), TorchOps' statements, where a decode step's dozens of few-microsecond torch ops
add up (at batch 1 on the 1B shape: ~2 ms of a 41 ms step); anything else falls through to TorchOps.
`FusedOps` runs each through one Triton kernel (`kernels/fused_elementwise.py`), RoPE also writing K/V
into the paged cache: on a GPU, where each launch costs microseconds however little it computes, a
decode layer then issues 9 device ops instead of 35. For W8A8/FP8 layers the norms and SiLU-mul also quantize their output
per token for the next GEMM (its `input_quant`), saving that GEMM's own quantization pass.
The engine picks FusedOps with the Triton attention backend, CpuOps on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optcli.engine.attention.kv_centre import centre_keys, ensure_centre
from optcli.engine.attention.kv_quant import quant_scales
from optcli.engine.attention.rope import apply_rotary
from optcli.engine.attention.triton import TritonMetadata
from optcli.engine.kernels import cpu_layer_ops


class TorchOps:
    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 quant: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); without a residual, (RMSNorm(x), x). `quant` is
        ignored: the next layer quantizes its dense input itself. The weight's dtype says where to round,
        as transformers does per family: in the activation dtype, the row is rounded before the weight
        (Llama); an fp32 weight (Gemma's 1 + w) multiplies the fp32 row, rounded after."""
        if residual is not None:
            x = x + residual
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if weight.dtype != dtype:
            return (h * weight).to(dtype), x
        return weight * h.to(dtype), x

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        joint = adjacent_heads(q, k)
        if joint is not None:  # one rotation over q's and k's heads: half the ops (7 fewer a layer)
            both = apply_rotary(joint, cos, sin)
            return both[:, : q.shape[1]], both[:, q.shape[1]:]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    @classmethod
    def rotary_attend(cls, q, k, v, cos, sin, kv_cache, meta, window: int | None, scale: float | None = None,
                      softcap: float | None = None) -> torch.Tensor:
        """RoPE on q and k, then attention through the step's metadata (which stores K/V first). An 8-bit
        cache with a centre stores rope(k) - rope(c) (attention/kv_centre.py)."""
        centred = _centre_first(k, kv_cache, meta)
        q, k = cls.rotary(q, k, cos, sin)
        return meta.attend(q, centred(k, cos, sin), v, kv_cache, window, scale, softcap)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor, quant: torch.dtype | None = None) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @classmethod
    def act_mul(cls, gate_up: torch.Tensor, act: str, quant: torch.dtype | None = None) -> torch.Tensor:
        """act(gate) * up: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)."""
        if act == "silu":
            return cls.silu_mul(gate_up, quant)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


class CpuOps(TorchOps):
    """TorchOps with fp32 rows on CPU taken by one C call each; the rest (bf16 activations, Gemma's fp32 (1 + w)
    norm weight over bf16 rows, odd layouts) falls through to TorchOps."""

    name = "cpu"

    @staticmethod
    def rms_norm(x, weight, eps, residual=None, quant=None):
        done = cpu_layer_ops.rms_norm(x, weight, eps, residual)
        return done if done is not None else TorchOps.rms_norm(x, weight, eps, residual, quant)

    @staticmethod
    def rotary(q, k, cos, sin):
        if cpu_layer_ops.rotary_(q, k, cos, sin):  # in place: q and k are views of this step's own qkv output
            return q, k
        return TorchOps.rotary(q, k, cos, sin)

    @staticmethod
    def silu_mul(gate_up, quant=None):
        done = cpu_layer_ops.silu_mul(gate_up)
        return done if done is not None else TorchOps.silu_mul(gate_up, quant)


class FusedOps:
    # Each method imports its kernel when called: triton is optional (absent from the CPU build of torch).
    name = "triton"

    @staticmethod
    def rms_norm(x, weight, eps, residual=None, quant=None):
        """As TorchOps, but with `quant` the normed rows come back quantized per token (a QuantizedInput)."""
        from optcli.engine.kernels.fused_elementwise import rms_norm

        return rms_norm(x, weight, eps, residual, quant)

    @staticmethod
    def rotary(q, k, cos, sin):
        from optcli.engine.kernels.fused_elementwise import rotary_

        rotary_(q, k, cos, sin)  # in place: q and k are views of this step's own qkv output
        return q, k

    @classmethod
    def rotary_attend(cls, q, k, v, cos, sin, kv_cache, meta, window, scale=None, softcap=None):
        """With Triton metadata, one kernel rotates q and k and writes K/V to their cache slots
        (no separate store_kv launch); then attention reads them from the cache."""
        from optcli.engine.kernels.fused_elementwise import rotary_

        if not isinstance(meta, TritonMetadata) or len(kv_cache) > 2:  # an 8-bit cache quantizes in store_kv
            centred = _centre_first(k, kv_cache, meta)  # before the in-place rotation
            q, k = cls.rotary(q, k, cos, sin)
            return meta.attend(q, centred(k, cos, sin), v, kv_cache, window, scale, softcap)
        rotary_(q, k, cos, sin, store=(v, kv_cache[0], kv_cache[1], meta.slot_mapping))
        return meta.attend_cached(q, kv_cache, window, scale, softcap)

    @staticmethod
    def silu_mul(gate_up, quant=None):
        from optcli.engine.kernels.fused_elementwise import silu_mul

        return silu_mul(gate_up, quant=quant)

    @staticmethod
    def act_mul(gate_up, act, quant=None):
        from optcli.engine.kernels.fused_elementwise import silu_mul

        return silu_mul(gate_up, quant=quant, act=act)


def _uncentred(k_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return k_rot


def _centre_first(k: torch.Tensor, kv_cache, meta):
    """For an 8-bit cache that centres K (attention/kv_centre.py): set the layer's centre from the pre-RoPE keys
    k on its first write, and return the function that centres the rotated keys for the store (identity
    otherwise). With Triton metadata both are decided on the device (CUDA graphs)."""
    scales = quant_scales(kv_cache)
    if scales is None or scales.rope is None:
        return _uncentred
    on_device = isinstance(meta, TritonMetadata)
    ensure_centre(scales, k, live=meta.slot_mapping >= 0 if on_device else None, on_device=on_device)
    return lambda k_rot, cos, sin: centre_keys(scales, k_rot, cos, sin, on_device)


def adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q [T, H, D] and k [T, KV, D] as one [T, H + KV, D] view where k's heads follow q's in memory
    (both views of the fused qkv projection's output), else None."""
    if q.dim() != 3 or q.stride() != k.stride() or q.stride(1) != q.shape[2] or q.stride(2) != 1 or q.dtype != k.dtype:
        return None
    if q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * q.shape[2] * q.element_size():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())
