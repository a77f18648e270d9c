"""Quantized weights as the engine keeps them: integers (or fp8) plus scales, never upcast whole.

One class per storage format, in a device-neutral canonical form that `quant/linear.py` packs for
its kernels. Each knows its dense value (`dequantize`, the reference every kernel is tested
against), how to join the q/k/v or gate/up parts the model fuses (`cat`, along output rows), and
a round-to-nearest constructor (`rtn`) that tests and benchmarks use to make one from a dense
weight; real checkpoints come through `quant/checkpoint.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optcli.engine.kernels.quant_reference import FP8_MAX

INT8_MAX = 127.0


@dataclass
class Int4Weight:
    """W4A16: w[n, k] = (q[n, k] - 8) * scales[n, g] + zeros[n, g], g = k // group_size, in the
    permuted input order `perm` (act-order checkpoints; None = natural order).

    q holds unsigned nibbles 0..15 (the signed value + 8); `zeros` is None for symmetric schemes
    and otherwise the float offset -zero_point * scale (the convention torch's int4 kernels use).
    """

    q: torch.Tensor  # uint8 [N, K], values 0..15
    scales: torch.Tensor  # float32 [N, K // group_size]
    zeros: torch.Tensor | None  # float32 [N, K // group_size] or None
    group_size: int
    perm: torch.Tensor | None = None  # int64 [K]: input channel order the groups are laid out in
    kind = "int4"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """Dense float32 [N, K] in the checkpoint's (natural) input order."""
        scales = self.scales.repeat_interleave(self.group_size, dim=1)
        w = (self.q.float() - 8.0) * scales
        if self.zeros is not None:
            w = w + self.zeros.repeat_interleave(self.group_size, dim=1)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w

    @classmethod
    def cat(cls, parts: list[Int4Weight]) -> Int4Weight:
        first = parts[0]
        if any(p.group_size != first.group_size or (p.zeros is None) != (first.zeros is None) for p in parts):
            raise ValueError("int4 parts differ in group size or symmetry")
        if any((p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm))
               for p in parts):
            raise ValueError("int4 parts use different act-order permutations")
        zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]), zeros,
                   first.group_size, first.perm)

    @classmethod
    def rtn(cls, weight: torch.Tensor, group_size: int = 128, symmetric: bool = True) -> Int4Weight:
        """Round-to-nearest with min-max scales per group (the compressed-tensors convention)."""
        n, k = weight.shape
        group_size = min(group_size, k)
        w = weight.float().reshape(n, k // group_size, group_size)
        if symmetric:
            scales = (w.abs().amax(-1) / 7.5).clamp_min(1e-8)  # [-8, 7] covers -absmax..absmax with 7.5
            q = (w / scales[..., None]).round().clamp(-8, 7) + 8
            zeros = None
        else:
            lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
            scales = ((hi - lo) / 15).clamp_min(1e-8)
            zp = (-8 - lo / scales).round().clamp(-8, 7)  # signed zero point
            q = (w / scales[..., None] + zp[..., None]).round().clamp(-8, 7) + 8
            zeros = -zp * scales
        return cls(q.reshape(n, k).to(torch.uint8), scales, zeros, group_size)


@dataclass
class _ChannelWeight:
    """8-bit weights with one scale per output channel: w = q * scales[n]. With `act_quant`,
    activations are quantized per token at run time, as the checkpoint's scheme prescribes."""

    q: torch.Tensor  # [N, K], int8 or float8_e4m3fn
    scales: torch.Tensor  # float32 [N]
    act_quant: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales[:, None]

    @classmethod
    def cat(cls, parts: list) -> _ChannelWeight:
        if len({p.act_quant for p in parts}) > 1:
            raise ValueError(f"{cls.kind} parts differ in activation quantization")
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]), parts[0].act_quant)


class Int8Weight(_ChannelWeight):
    """INT8 per channel (W8A8 with `act_quant`, else int8 weight-only)."""

    kind = "int8"

    @classmethod
    def rtn(cls, weight: torch.Tensor, act_quant: bool = True) -> Int8Weight:
        scales = (weight.float().abs().amax(1) / INT8_MAX).clamp_min(1e-8)
        q = (weight.float() / scales[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return cls(q, scales, act_quant)


class Fp8Weight(_ChannelWeight):
    """FP8 (E4M3) per channel; with `act_quant`, FP8 activations per token (FP8_DYNAMIC)."""

    kind = "fp8"

    @classmethod
    def rtn(cls, weight: torch.Tensor, act_quant: bool = True) -> Fp8Weight:
        scales = (weight.float().abs().amax(1) / FP8_MAX).clamp_min(1e-12)
        q = (weight.float() / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return cls(q, scales, act_quant)


@dataclass
class BnbNf4Weight:
    """bitsandbytes 4-bit (NF4/FP4) blockwise weights; run through bitsandbytes' own kernels.

    Double-quantized absmax is expanded to float32 at load (a few KB per layer) so parts can be
    joined: their flattened blocks simply follow each other.
    """

    packed: torch.Tensor  # uint8 [N * K / 2, 1]
    absmax: torch.Tensor  # float32 [N * K / blocksize]
    code: torch.Tensor  # float32 [16]: the NF4/FP4 code book
    blocksize: int
    quant_type: str
    out_features: int
    in_features: int
    kind = "nf4"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def quant_state(self, dtype: torch.dtype):
        from bitsandbytes.functional import QuantState

        return QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code,
                          blocksize=self.blocksize, quant_type=self.quant_type, dtype=dtype)

    DEFAULT_BLOCKSIZE = 64  # bitsandbytes' default, what `nf4-bnb` artifacts hold

    @classmethod
    def rtn(cls, weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, quant_type: str = "nf4") -> BnbNf4Weight:
        """`weight` quantized by bitsandbytes itself, in blocks of `blocksize` inputs."""
        from bitsandbytes.functional import quantize_4bit

        n, k = weight.shape
        packed, state = quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
        return cls(packed, state.absmax.float(), state.code.float(), blocksize, quant_type, n, k)

    def dequantize(self) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.packed, self.quant_state(torch.float32)).float()

    @classmethod
    def cat(cls, parts: list[BnbNf4Weight]) -> BnbNf4Weight:
        first = parts[0]
        if any(p.blocksize != first.blocksize or p.quant_type != first.quant_type or p.in_features != first.in_features
               or (p.out_features * p.in_features) % p.blocksize for p in parts):
            raise ValueError("bitsandbytes 4-bit parts cannot be joined block for block")
        return cls(torch.cat([p.packed for p in parts]), torch.cat([p.absmax for p in parts]), first.code,
                   first.blocksize, first.quant_type, sum(p.out_features for p in parts), first.in_features)


@dataclass
class BnbInt8Weight:
    """bitsandbytes LLM.int8(): int8 rows with absmax scales (SCB); activation columns above
    `threshold` run in 16-bit (the outlier decomposition), the rest in int8."""

    q: torch.Tensor  # int8 [N, K]
    scb: torch.Tensor  # float32 [N]: row absmax
    threshold: float = 6.0
    kind = "int8-bnb"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scb[:, None] / INT8_MAX

    @classmethod
    def cat(cls, parts: list[BnbInt8Weight]) -> BnbInt8Weight:
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scb for p in parts]), parts[0].threshold)


QuantWeight = Int4Weight | Int8Weight | Fp8Weight | BnbNf4Weight | BnbInt8Weight


def is_quantized(value) -> bool:
    return isinstance(value, Int4Weight | Int8Weight | Fp8Weight | BnbNf4Weight | BnbInt8Weight)


def cat_weights(parts: list) -> QuantWeight | torch.Tensor:
    """Join fused parts along output rows; parts of mixed formats fall back to dense float32."""
    if all(not is_quantized(p) for p in parts):
        return torch.cat(parts)
    kinds = {type(p) for p in parts}
    if len(kinds) == 1:
        try:
            return kinds.pop().cat(parts)
        except ValueError:
            pass
    return torch.cat([p.dequantize() if is_quantized(p) else p.float() for p in parts])
