"""Dequantize-on-load: any artifact `optcli quantize` writes -> plain float tensors under HF names.

Our engine runs dense float math on CPU, so instead of teaching it every storage format we
decompress once at load time with each format's own library (compressed-tensors, bitsandbytes),
so packing and scale conventions stay the libraries' business. Safetensors only: no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from optcli.errors import UsageError

SUPPORTED_METHODS = ("none", "compressed-tensors", "bitsandbytes")
INDEX_FILE = "model.safetensors.index.json"
# Tensors that only feed quantized kernels; a dense model has no use for them.
_BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")


def load_dense_state_dict(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor the model needs, dense `dtype`, HF names; quantization-only tensors dropped.

    A tied `lm_head.weight` is returned only if the checkpoint stores one (the engine ties it).
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{config_path}: not found (not a Hugging Face model directory)") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{config_path}: unreadable config ({_first_line(exc)})") from None
    qconfig = config.get("quantization_config") or {}
    method = qconfig.get("quant_method", "none") if isinstance(qconfig, dict) else "?"
    if method not in SUPPORTED_METHODS:
        raise UsageError(
            f"{config_path}: cannot dequantize quant_method '{method}' (supported: {', '.join(SUPPORTED_METHODS)})"
        )
    if method == "compressed-tensors":
        _check_compressed_tensors_config(qconfig, config_path)
    tensors, origin = _read_safetensors(model_dir)
    files = sorted(set(origin.values()))
    where = files[0] if len(files) == 1 else model_dir
    try:
        if method == "compressed-tensors":
            tensors = _decompress_compressed_tensors(qconfig, tensors)
        elif method == "bitsandbytes":
            tensors = _dequantize_bitsandbytes(tensors)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    except (KeyError, IndexError, ValueError, RuntimeError, AssertionError, TypeError) as exc:
        raise UsageError(f"{where}: corrupt {method} checkpoint ({_first_line(exc)})") from None
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        # fp8 counts as floating point to torch, so also require at least 16 bits.
        if not tensor.is_floating_point() or tensor.element_size() < 2:
            raise UsageError(
                f"{origin.get(name, where)}: tensor '{name}' is still quantized ({tensor.dtype}) "
                f"after '{method}' dequantization"
            )
        out[name] = tensor.to(dtype)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_safetensors(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors from the index's shards (or every *.safetensors), plus which file each came from."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [model_dir / f for f in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{index}: corrupt safetensors index ({_first_line(exc)})") from None
        for f in files:
            if not f.is_file():
                raise UsageError(f"{f}: shard listed in {INDEX_FILE} is missing")
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir}: no *.safetensors weights found (only safetensors are read, never pickle)")
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        try:
            part = load_file(f, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UsageError(f"{f}: corrupt or truncated safetensors file ({_first_line(exc)})") from None
        for name, tensor in part.items():
            if name in tensors:
                raise UsageError(f"{f}: tensor '{name}' also appears in {origin[name].name}")
            tensors[name] = tensor
            origin[name] = f
    return tensors, origin


def _check_compressed_tensors_config(qconfig: dict, config_path: Path) -> None:
    """Refuse what dense weights alone cannot express: packed sparsity, online rotations."""
    sparsity = (qconfig.get("sparsity_config") or {}).get("format", "dense")
    if sparsity != "dense":
        raise UsageError(
            f"{config_path}: cannot dequantize compressed-tensors sparsity format '{sparsity}' (supported: dense)"
        )
    if qconfig.get("transform_config"):
        raise UsageError(
            f"{config_path}: cannot dequantize compressed-tensors transforms (rotations need the engine's help)"
        )


def _decompress_compressed_tensors(qconfig: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per module, compressed-tensors' own compressor for the scheme's format does the unpacking.

    We drive the library's per-module `decompress` ourselves rather than its model-free
    `CompressedTensorsDequantizer`, which fails on targeted modules stored unquantized
    (e.g. embeddings under `targets: [Linear]` in an int-/float-quantized checkpoint).
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationMetadata
    from compressed_tensors.utils.match import match_quantizable_tensors

    config = QuantizationConfig.model_validate(qconfig)
    tensors = dict(tensors)
    dense: dict[str, torch.Tensor] = {}
    for scheme in config.config_groups.values():
        fmt = scheme.format or (config.format if config.format != "mixed-precision" else None)
        fmt = fmt or infer_module_format(torch.nn.Linear, scheme)
        compressor = BaseCompressor.get_value_from_registry(getattr(fmt, "value", fmt))
        names = compressor.compression_param_names(scheme)
        matches = list(match_quantizable_tensors(tensors, config.ignore, scheme.targets, [names[0]]))
        for module, _ in matches:
            # Dense format is already float; a bare `weight` is a module stored unquantized.
            if len(names) == 1 or (names[0] == "weight" and f"{module}.{names[1]}" not in tensors):
                continue
            if f"{module}.{names[1]}" not in tensors:
                raise KeyError(f"{module}.{names[1]}")
            local = {n: tensors.pop(f"{module}.{n}") for n in names if f"{module}.{n}" in tensors}
            # Scales in fp32 so q * scale is exact rather than rounded to the checkpoint's bf16.
            local = {n: t.float() if n != names[0] and t.is_floating_point() else t for n, t in local.items()}
            dense[f"{module}.weight"] = compressor.decompress(local, scheme)["weight"].float()
    # Scales and zero points only serve quantized kernels. A leftover weight_packed is kept so the
    # caller's dtype check names it: that module matched no config group.
    qparams = set(QuantizationMetadata.all_qparam_names()) | {"q_scale"}
    dense.update({n: t for n, t in tensors.items() if n.rpartition(".")[2] not in qparams})
    return dense


def _dequantize_bitsandbytes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NF4/FP4 via `dequantize_4bit` with the saved QuantState; LLM.int8 rows via weight * SCB / 127."""
    import bitsandbytes.functional as bnbf

    tensors = dict(tensors)
    dense: dict[str, torch.Tensor] = {}
    packed_states = [n for n in tensors if ".quant_state.bitsandbytes__" in n]
    for state_name in packed_states:
        weight_name = state_name.split(".quant_state.")[0]
        prefix = weight_name + "."
        parts = {n[len(prefix) :]: tensors.pop(n) for n in list(tensors) if n.startswith(prefix)}
        state = bnbf.QuantState.from_dict(parts, device=torch.device("cpu"))
        state.dtype = torch.float32  # dequantize in fp32, not the checkpoint's bf16
        dense[weight_name] = bnbf.dequantize_4bit(tensors.pop(weight_name), state).float()
    for scb_name in [n for n in tensors if n.endswith(".SCB")]:
        module = scb_name[: -len(".SCB")]
        fmt = tensors.pop(f"{module}.weight_format", None)
        if fmt is not None and int(fmt) != 0:
            raise UsageError(f"'{module}': unsupported LLM.int8 weight layout {int(fmt)} (supported: row)")
        weight = tensors.pop(f"{module}.weight")
        if weight.dtype != torch.int8:
            raise ValueError(f"'{module}.weight' is {weight.dtype}, expected int8 next to SCB")
        dense[f"{module}.weight"] = bnbf.int8_vectorwise_dequant(weight, tensors.pop(scb_name).float())
    for name, tensor in tensors.items():
        if name.endswith(_BNB_SUFFIXES) or ".quant_state." in name:
            raise UsageError(f"bitsandbytes tensor '{name}' has no quantized weight to go with")
        dense[name] = tensor
    return dense
