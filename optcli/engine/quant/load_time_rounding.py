"""Quantize a dense checkpoint's decoder linears at load time (round to nearest), like vLLM's
`quantization="fp8"`: no calibration, no artifact, the same kernels as a quantized checkpoint.

Accuracy is RTN's (use `optcli quantize` with GPTQ/AWQ for better); speed and memory are the
format's. The benchmark uses it to run one bf16 model in every format without writing artifacts.
"""

from __future__ import annotations

import re

import torch

from optcli.engine.quant.weights import Fp8Weight, Int4Weight, Int8Weight, is_quantized
from optcli.errors import UsageError

# Decoder projections only: embeddings and the LM head stay in the model dtype, as the recipes do.
_TARGET = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")

ONLINE_SCHEMES = {
    "w4a16": lambda w: Int4Weight.rtn(w, 128, symmetric=True),
    "w8a8": lambda w: Int8Weight.rtn(w, act_quant=True),
    "w8a16": lambda w: Int8Weight.rtn(w, act_quant=False),
    "fp8": lambda w: Fp8Weight.rtn(w, act_quant=True),
}


def quantize_state_dict(state: dict, scheme: str, device: str) -> dict:
    """Replace each dense decoder projection weight by its `scheme` form, computed on `device`."""
    if scheme not in ONLINE_SCHEMES:
        raise UsageError(f"unknown online quantization '{scheme}' (choose from: {', '.join(ONLINE_SCHEMES)})")
    make = ONLINE_SCHEMES[scheme]
    out = {}
    for name, value in state.items():
        if _TARGET.search(name) and not is_quantized(value) and (scheme != "w4a16" or value.shape[1] % 128 == 0):
            value = make(value.to(device, torch.float32))
        out[name] = value
    return out
