"""Calibrated KV-cache scales from a compressed-tensors artifact: llm-compressor's `kv_cache_scheme` (in
config.json's quantization_config) and the `self_attn.k_scale` / `v_scale` tensors it saves per layer, one per
tensor or one per KV head, in its convention x ≈ q * scale (as vLLM reads them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from optcli.errors import UsageError


@dataclass(frozen=True)
class CalibratedKV:
    kv_cache_dtype: str  # fp8_e4m3 | int8
    strategy: str  # tensor | attn_head | ...: as the artifact says
    k_scales: dict[int, torch.Tensor]  # layer -> [1] or [KV] fp32
    v_scales: dict[int, torch.Tensor]

    def layer(self, index: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) scales [KV] of one layer; a per-tensor scale is repeated for every head."""
        out = []
        for name, table in (("k_scale", self.k_scales), ("v_scale", self.v_scales)):
            if index not in table:
                raise UsageError(f"kv_cache_scheme: layer {index} has no self_attn.{name} in the checkpoint")
            s = table[index].float().reshape(-1)
            if s.numel() not in (1, kv_heads) or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
                raise UsageError(f"kv_cache_scheme: layer {index} self_attn.{name} has {s.numel()} values "
                                 f"(expected 1 or {kv_heads}, all positive)")
            out.append(s.expand(kv_heads).clone())
        return out[0], out[1]


def scheme_dtype(scheme: dict) -> str:
    kind, bits = scheme.get("type"), scheme.get("num_bits")
    if bits == 8 and kind == "float":
        return "fp8_e4m3"
    if bits == 8 and kind == "int" and scheme.get("symmetric", True):
        return "int8"
    raise UsageError(f"kv_cache_scheme {kind} {bits}-bit is not supported (fp8 or symmetric int8)")


def read_calibrated_kv(model_dir: str | Path) -> CalibratedKV | None:
    """The artifact's calibrated KV scales, or None when its config has no kv_cache_scheme."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the weights' loader reports an unreadable config
    qconfig = config.get("quantization_config") or {}
    scheme = qconfig.get("kv_cache_scheme") if isinstance(qconfig, dict) else None
    if not scheme:
        return None
    if scheme.get("dynamic"):
        raise UsageError(f"{model_dir}: a dynamic kv_cache_scheme carries no scales to read; "
                         "serve it with --kv-cache-dtype fp8 or int8 (scales set at run time)")
    from safetensors import safe_open

    k_scales: dict[int, torch.Tensor] = {}
    v_scales: dict[int, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as handle:
            for name in handle.keys():
                stem, _, leaf = name.rpartition(".")
                if leaf not in ("k_scale", "v_scale") or ".layers." not in stem:
                    continue
                index = int(stem.split(".layers.")[1].split(".")[0])
                (k_scales if leaf == "k_scale" else v_scales)[index] = handle.get_tensor(name)
    if not k_scales:
        raise UsageError(f"{model_dir}: config has a kv_cache_scheme but no self_attn.k_scale tensors")
    return CalibratedKV(scheme_dtype(scheme), str(scheme.get("strategy", "tensor")), k_scales, v_scales)
