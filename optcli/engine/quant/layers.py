"""Which layer class runs which quantized weight (`make_quant_linear`), and the per-mode count of a
model's quantized layers that the engine reports (`quant_summary`)."""

from __future__ import annotations

import torch
from torch import nn

from optcli.engine.quant.bnb_linear import BnbInt8Linear, BnbNf4Linear
from optcli.engine.quant.fp8_linear import Fp8Linear
from optcli.engine.quant.linear import Int4Linear, Int8Linear, QuantLinear
from optcli.engine.quant.weights import BnbInt8Weight, BnbNf4Weight, Fp8Weight, Int4Weight, Int8Weight

_LAYERS = {Int4Weight: Int4Linear, Int8Weight: Int8Linear, Fp8Weight: Fp8Linear, BnbNf4Weight: BnbNf4Linear,
           BnbInt8Weight: BnbInt8Linear}


def make_quant_linear(weight, bias: torch.Tensor | None, device, dtype: torch.dtype,
                      compute_dtypes: tuple[torch.dtype, ...] = ()) -> QuantLinear:
    """The format's layer; `compute_dtypes` are the dtypes besides `dtype` its CPU kernels may compute in."""
    layer = _LAYERS[type(weight)]
    if layer in (Int4Linear, Int8Linear, Fp8Linear):
        return layer(weight, bias, device, dtype, compute_dtypes=compute_dtypes)
    return layer(weight, bias, device, dtype)


def quant_summary(model: nn.Module) -> dict[str, int]:
    """How many layers run each format through each path, e.g. {"int4/triton": 112}."""
    return path_counts(model.modules())


def path_counts(modules, dense: str | None = None) -> dict[str, int]:
    """How many of `modules` run each quantized format through each path ("int4/cpu"); any other module
    counts under `dense` when given, else not at all."""
    summary: dict[str, int] = {}
    for module in modules:
        key = f"{module.kind}/{module.mode}" if isinstance(module, QuantLinear) else dense
        if key is not None:
            summary[key] = summary.get(key, 0) + 1
    return summary
