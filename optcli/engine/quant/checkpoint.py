"""Checkpoint tensors -> the engine's quantized weights, format by format.

compressed-tensors: `pack-quantized` 4-bit (GPTQ/AWQ/RTN: group or channel scales, symmetric or
zero-point, act-order g_idx) -> Int4Weight; `int-quantized` 8-bit -> Int8Weight; `float-quantized`
FP8 -> Fp8Weight. bitsandbytes: NF4/FP4 -> BnbNf4Weight, LLM.int8 -> BnbInt8Weight. Anything else
the library can decompress (other bit widths, block scales, static activation scales) is
decompressed to a dense float weight by compressed-tensors itself, so it still loads, just not
fast. Bit unpacking uses compressed-tensors' own helpers so its layout conventions stay its own.
"""

from __future__ import annotations

import torch

from optcli.engine.quant.weights import BnbInt8Weight, BnbNf4Weight, Fp8Weight, Int4Weight, Int8Weight
from optcli.errors import UsageError


def compressed_tensors_weights(qconfig: dict, tensors: dict[str, torch.Tensor], keep_quantized: bool) -> dict:
    """Per module, a quantized weight where the engine has a kernel for its scheme, else dense."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationMetadata
    from compressed_tensors.utils.match import match_quantizable_tensors

    config = QuantizationConfig.model_validate(qconfig)
    tensors = dict(tensors)
    out: dict = {}
    for scheme in config.config_groups.values():
        fmt = scheme.format or (config.format if config.format != "mixed-precision" else None)
        fmt = getattr(fmt, "value", fmt) or getattr(infer_module_format(torch.nn.Linear, scheme), "value", None)
        compressor = BaseCompressor.get_value_from_registry(fmt)
        names = compressor.compression_param_names(scheme)
        for module, _ in list(match_quantizable_tensors(tensors, config.ignore, scheme.targets, [names[0]])):
            # Dense format is already float; a bare `weight` is a module stored unquantized.
            if len(names) == 1 or (names[0] == "weight" and f"{module}.{names[1]}" not in tensors):
                continue
            if f"{module}.{names[1]}" not in tensors:
                raise KeyError(f"{module}.{names[1]}")
            local = {n: tensors.pop(f"{module}.{n}") for n in names if f"{module}.{n}" in tensors}
            weight = _native(fmt, scheme, local) if keep_quantized else None
            if weight is None:
                # Scales in fp32 so q * scale is exact rather than rounded to the checkpoint's bf16.
                local = {n: t.float() if n != names[0] and t.is_floating_point() else t for n, t in local.items()}
                weight = compressor.decompress(local, scheme)["weight"].float()
            out[f"{module}.weight"] = weight
    # Scales and zero points only serve quantized kernels. A leftover weight_packed is kept so the
    # caller's dtype check names it: that module matched no config group.
    qparams = set(QuantizationMetadata.all_qparam_names()) | {"q_scale"}
    out.update({n: t for n, t in tensors.items() if n.rpartition(".")[2] not in qparams})
    return out


def _native(fmt: str, scheme, local: dict[str, torch.Tensor]):
    """The engine's own form of one module's weight, or None where it has no kernel for the scheme."""
    w, act = scheme.weights, scheme.input_activations
    if w is None or w.type not in ("int", "float") or getattr(w, "block_structure", None):
        return None
    strategy = getattr(w.strategy, "value", w.strategy)
    act_quant = act is not None
    if act is not None:
        act_strategy = getattr(act.strategy, "value", act.strategy)
        if not (act.dynamic and act_strategy == "token" and act.num_bits == 8 and act.symmetric and act.type == w.type):
            return None  # e.g. static per-tensor activation scales: decompress instead
    scale = local["weight_scale"].float()
    if fmt == "pack-quantized" and w.num_bits == 4 and w.type == "int" and strategy in ("group", "channel"):
        if act_quant:
            return None
        return _int4(w, local, scale, strategy)
    if strategy not in ("channel", "tensor") or not w.symmetric or w.num_bits != 8:
        return None
    if fmt == "pack-quantized" and w.type == "int" and not act_quant:
        # llm-compressor packs weight-only 8-bit (W8A16) into int32 words too: unpack to the int8 rows
        # Int8Weight keeps (per channel), so a mixed W4/W8 artifact runs each layer on its own kernel.
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        n, k = (int(d) for d in local["weight_shape"])
        q = unpack_from_int32(local["weight_packed"], 8, torch.Size((n, k))).to(torch.int8)
        return Int8Weight(q, scale.reshape(-1).expand(n).contiguous(), False)
    q = local["weight"]
    scales = scale.reshape(-1).expand(q.shape[0]).contiguous() if scale.numel() == 1 else scale.reshape(-1)
    if fmt == "int-quantized" and w.type == "int" and q.dtype == torch.int8:
        return Int8Weight(q, scales, act_quant)
    if fmt == "float-quantized" and w.type == "float" and q.dtype == torch.float8_e4m3fn:
        return Fp8Weight(q, scales, act_quant)
    return None


def _int4(w, local: dict[str, torch.Tensor], scale: torch.Tensor, strategy: str) -> Int4Weight | None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    n, k = (int(d) for d in local["weight_shape"])
    q = unpack_from_int32(local["weight_packed"], 4, torch.Size((n, k))).to(torch.int16)  # signed -8..7
    group_size = k if strategy == "channel" else int(w.group_size)
    if k % group_size or scale.shape != (n, k // group_size):
        return None  # ragged last group: no kernel lays that out
    zeros = None
    if not w.symmetric:
        zp = local.get("weight_zero_point")
        if zp is None:
            raise KeyError("weight_zero_point")
        if zp.dtype == torch.int32 and zp.shape[0] != n:  # packed along the output dimension
            zp = unpack_from_int32(zp, 4, torch.Size((n, scale.shape[1])), packed_dim=0)
        zeros = -zp.float() * scale
    perm = None
    g_idx = local.get("weight_g_idx")
    if g_idx is not None:
        g_idx = g_idx.long()
        if not torch.equal(g_idx, torch.arange(k) // group_size):
            # Act order: lay input channels out group by group so each group is contiguous again.
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], torch.arange(k) // group_size):
                return None  # groups of unequal size
            q = q[:, perm]
    return Int4Weight((q + 8).to(torch.uint8), scale, zeros, group_size, perm)


BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")


def bitsandbytes_weights(tensors: dict[str, torch.Tensor], qconfig: dict, keep_quantized: bool) -> dict:
    """NF4/FP4 through bitsandbytes' saved QuantState; LLM.int8 rows with their SCB absmax."""
    import bitsandbytes.functional as bnbf

    tensors = dict(tensors)
    out: dict = {}
    threshold = float(qconfig.get("llm_int8_threshold", 6.0) or 0.0)
    for state_name in [n for n in tensors if ".quant_state.bitsandbytes__" in n]:
        weight_name = state_name.split(".quant_state.")[0]
        prefix = weight_name + "."
        parts = {n[len(prefix) :]: tensors.pop(n) for n in list(tensors) if n.startswith(prefix)}
        state = bnbf.QuantState.from_dict(parts, device=torch.device("cpu"))
        packed = tensors.pop(weight_name)
        absmax = state.absmax
        if state.nested:  # expand the double-quantized absmax once: a few KB, and parts can be joined
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
        weight = BnbNf4Weight(packed, absmax.float(), state.code.float(), state.blocksize, state.quant_type,
                              int(state.shape[0]), int(state.shape[1]))
        out[weight_name] = weight if keep_quantized else weight.dequantize()
    for scb_name in [n for n in tensors if n.endswith(".SCB")]:
        module = scb_name[: -len(".SCB")]
        fmt = tensors.pop(f"{module}.weight_format", None)
        if fmt is not None and int(fmt) != 0:
            raise UsageError(f"'{module}': unsupported LLM.int8 weight layout {int(fmt)} (supported: row)")
        q = tensors.pop(f"{module}.weight")
        if q.dtype != torch.int8:
            raise ValueError(f"'{module}.weight' is {q.dtype}, expected int8 next to SCB")
        weight = BnbInt8Weight(q, tensors.pop(scb_name).float(), threshold)
        out[f"{module}.weight"] = weight if keep_quantized else bnbf.int8_vectorwise_dequant(q, weight.scb)
    for name, tensor in tensors.items():
        if name.endswith(BNB_SUFFIXES) or ".quant_state." in name:
            raise UsageError(f"bitsandbytes tensor '{name}' has no quantized weight to go with")
        out[name] = tensor
    return out
