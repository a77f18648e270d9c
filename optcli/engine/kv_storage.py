"""The KV cache's memory: one tensor [layers, 2, slots, KV heads, head dim] in the chosen dtype, handed to the
layers as per-layer (k_cache, v_cache) pairs, or QuantKVCache triples when 8-bit (attention/kv_quant.py).

`kv_cache_dtype="auto"` stores the model dtype, unless the artifact carries a calibrated `kv_cache_scheme`
(llm-compressor), which then decides; an explicit 8-bit dtype uses the artifact's scales when it has them, else
scales set by each layer's first write.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optcli.engine.attention.kv_quant import KVScales, QuantKVCache, is_quantized_dtype, storage_dtype
from optcli.engine.loading.kv_scales import CalibratedKV
from optcli.errors import UsageError


@dataclass
class KVStorage:
    tensor: torch.Tensor  # [layers, 2, slots, KV, D]
    caches: list  # per layer: (k, v) or QuantKVCache
    kv_cache_dtype: str  # resolved: bfloat16 | float16 | float32 | fp8_e4m3 | int8
    scale_source: str | None  # "calibrated" (the artifact's kv_cache_scheme) | "dynamic" (first write) | None

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def scales(self) -> list[KVScales]:
        return [c[2] for c in self.caches if len(c) > 2]

    def reset_dynamic_scales(self) -> None:
        """After a warm-up or CUDA-graph capture wrote dummy K/V: the first real write sets the scales."""
        for s in self.scales:
            s.reset()

    def describe(self, block_size: int) -> dict:
        """What report.json records about the cache (workload.engine.kv_cache)."""
        layers, _, slots, kv_heads, dim = self.tensor.shape
        per_token = 2 * layers * kv_heads * dim * self.tensor.element_size()
        return {"dtype": self.kv_cache_dtype, "scale_source": self.scale_source,
                "bytes_per_token": per_token, "tokens": slots, "blocks": slots // block_size, "bytes": self.nbytes}


def resolve_kv_dtype(requested: str, model_dtype: torch.dtype, calibrated: CalibratedKV | None) -> str:
    """The cache's dtype name: `auto` takes the artifact's scheme when it has one, else the model dtype."""
    if requested == "auto":
        return calibrated.kv_cache_dtype if calibrated is not None else str(model_dtype).removeprefix("torch.")
    return "fp8_e4m3" if requested == "fp8" else requested


def bytes_per_block(cfg, block_size: int, kv_cache_dtype: str, model_dtype: torch.dtype) -> int:
    itemsize = storage_dtype(kv_cache_dtype, model_dtype).itemsize
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize


def allocate(cfg, num_slots: int, kv_cache_dtype: str, model_dtype: torch.dtype, device,
             calibrated: CalibratedKV | None) -> KVStorage:
    dtype = storage_dtype(kv_cache_dtype, model_dtype)
    shape = (cfg.num_layers, 2, num_slots, cfg.num_kv_heads, cfg.head_dim)
    tensor = torch.zeros(shape, dtype=dtype, device=device)
    if not is_quantized_dtype(dtype):
        return KVStorage(tensor, [(c[0], c[1]) for c in tensor], kv_cache_dtype, None)
    use_calibrated = calibrated is not None and calibrated.kv_cache_dtype == kv_cache_dtype
    if calibrated is not None and not use_calibrated:
        # The artifact's scales are for its own format (e.g. fp8's amax / 448); another 8-bit format gets its own
        raise UsageError(f"kv_cache_dtype {kv_cache_dtype} differs from the artifact's calibrated "
                         f"kv_cache_scheme ({calibrated.kv_cache_dtype}); use auto or {calibrated.kv_cache_dtype}")
    caches = []
    for layer, c in enumerate(tensor):
        if use_calibrated:
            k, v = calibrated.layer(layer, cfg.num_kv_heads)
            k, v = (s[:, None].expand(-1, cfg.head_dim).contiguous().to(device) for s in (k, v))
            scales = KVScales(k, v, calibrated=True, ready=True)
        else:
            scales = KVScales.unset(cfg.num_kv_heads, cfg.head_dim, device)
        caches.append(QuantKVCache(c[0], c[1], scales))
    return KVStorage(tensor, caches, kv_cache_dtype, "calibrated" if use_calibrated else "dynamic")


def attach_rope(storage: KVStorage, rotary, rope_kinds: list[str] | None, need_table: bool = False) -> None:
    """Give each 8-bit layer its RoPE (positions -> cos, sin), which turns on centring K before RoPE
    (attention/kv_centre.py). Not for dynamic NTK, whose cos/sin depend on the batch, so a key's rotation at read
    time could differ from the one it was stored with. `need_table`: the Triton kernels read the precomputed
    cos|sin table (RotaryEmbedding.build_table); a layer without one is not centred."""
    for layer, scales in enumerate(storage.scales):
        kind = rope_kinds[layer] if rope_kinds else None
        rope = rotary.tables[rotary.kinds.index(kind)]
        usable = rope.rope_type != "dynamic" and (rope.table is not None or not need_table)
        scales.rope = rope if usable else None
