"""Any artifact `optcli quantize` writes -> tensors under HF names, quantized weights kept quantized.

Weights the engine has kernels for stay integers (or fp8) plus scales (`quant/checkpoint.py`); the
rest, and everything when a dense copy is asked for, is decompressed with each format's own
library (compressed-tensors, bitsandbytes), so packing and scale conventions stay the libraries'
business. Safetensors only: no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from optcli.engine.models.config import TEXT_DECODERS
from optcli.engine.quant.checkpoint import bitsandbytes_weights, compressed_tensors_weights
from optcli.engine.quant.weights import is_quantized
from optcli.errors import UsageError

SUPPORTED_METHODS = ("none", "compressed-tensors", "bitsandbytes")
INDEX_FILE = "model.safetensors.index.json"


def load_dense_state_dict(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor the model needs, dense `dtype`, HF names; quantization-only tensors dropped.

    A tied `lm_head.weight` is returned only if the checkpoint stores one (the engine ties it).
    """
    return load_state_dict(model_dir, dtype, keep_quantized=False)


def save_dense_twin(model_dir: str | Path, out: str | Path) -> Path:
    """The artifact's dequantized twin: its dense fp32 weights (`load_dense_state_dict`) and its config without
    `quantization_config`, written to `out` (created) as a plain checkpoint transformers loads. Returns `out`."""
    from safetensors.torch import save_file

    model_dir, out = Path(model_dir), Path(out)
    out.mkdir(parents=True)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    save_file({k: v.contiguous() for k, v in load_dense_state_dict(model_dir).items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    return out


def load_state_dict(model_dir: str | Path, dtype: torch.dtype | None = torch.float32,
                    keep_quantized: bool = True) -> dict:
    """Like `load_dense_state_dict`, but a weight the engine has a kernel for stays quantized: its
    value is then a `quant.weights` object (integers plus scales) instead of a float tensor.
    `dtype=None` keeps each float tensor in the checkpoint's own dtype (the engine converts)."""
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
    if (config.get("architectures") or [None])[0] in TEXT_DECODERS:
        origin = memory_names(origin)
        tensors = memory_names(tensors)
    files = sorted(set(origin.values()))
    where = files[0] if len(files) == 1 else model_dir
    try:
        if method == "compressed-tensors":
            tensors = compressed_tensors_weights(qconfig, tensors, keep_quantized)
        elif method == "bitsandbytes":
            tensors = bitsandbytes_weights(tensors, qconfig, keep_quantized)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    except (KeyError, IndexError, ValueError, RuntimeError, AssertionError, TypeError) as exc:
        raise UsageError(f"{where}: corrupt {method} checkpoint ({_first_line(exc)})") from None
    out: dict = {}
    for name, tensor in tensors.items():
        if is_quantized(tensor):
            out[name] = tensor
            continue
        # fp8 counts as floating point to torch, so also require at least 16 bits.
        if not tensor.is_floating_point() or tensor.element_size() < 2:
            raise UsageError(
                f"{origin.get(name, where)}: tensor '{name}' is still quantized ({tensor.dtype}) "
                f"after '{method}' dequantization"
            )
        out[name] = tensor if dtype is None else tensor.to(dtype)
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


# A multimodal checkpoint as transformers saves it -> as it holds it in memory, the names llm-compressor
# gives its quantization targets (so a quantized artifact's config matches its tensors only after this).
SAVED_TO_MEMORY = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                   ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def memory_names(tensors: dict) -> dict:
    """A multimodal checkpoint's tensors under transformers' in-memory names (either naming accepted)."""
    out = {}
    for name, value in tensors.items():
        for saved, memory in SAVED_TO_MEMORY:
            if name.startswith(saved):
                name = memory + name[len(saved):]
                break
        out[name] = value
    return out


def text_decoder_weights(state: dict) -> dict:
    """The text decoder's tensors of a multimodal checkpoint (in-memory names, `memory_names`) under a
    causal LM's names (model.layers..., lm_head); the vision tower and its projector are dropped, since the
    engine runs text only."""
    prefix = "model.language_model."
    return {("model." + name[len(prefix):] if name.startswith(prefix) else name): value
            for name, value in state.items() if name.startswith((prefix, "lm_head."))}
