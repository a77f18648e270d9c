"""Activation-outlier report (`optcli calibrate --stats`): where a model's activation outliers are.

A few input channels of a linear layer with magnitudes far above the rest are what make plain
round-to-nearest (and per-tensor INT8 activations) lose accuracy; SmoothQuant migrates them into
the weights and AWQ protects the weight channels they multiply. Forward pre-hooks keep, per
linear layer, a running per-input-channel absmax (one vector of in_features), so memory stays
bounded however many batches stream through.
"""

from __future__ import annotations

import math

# Outlier ratio = largest channel absmax / median channel absmax. With absmax INT8 scaling a channel
# at the median keeps about 127 / ratio levels: ≥ 20 leaves it ≤ 6 levels (outliers dominate: protect
# them), under 8 it keeps ≥ 16 levels (outliers are no reason to leave GPTQ).
HIGH_OUTLIER_RATIO = 20.0
MODERATE_OUTLIER_RATIO = 8.0
SKIPPED = ("lm_head",)  # every recipe keeps the output head unquantized


def activation_stats(model, windows: list[list[int]], batch_size: int = 8, top_channels: int = 3) -> dict:
    """Run `windows` through `model` in batches of equal-length windows; per nn.Linear input and weight statistics."""
    import torch

    running: dict[str, torch.Tensor] = {}
    handles = []
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in SKIPPED}

    def hook(name: str):
        def record(_module, inputs) -> None:
            x = inputs[0].detach()
            channel = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
            running[name] = channel if name not in running else torch.maximum(running[name], channel)

        return record

    for name, module in linears.items():
        handles.append(module.register_forward_pre_hook(hook(name)))
    device = next(model.parameters()).device
    batches = tokens = 0
    try:
        with torch.no_grad():
            for batch in _batches(windows, batch_size):
                model(input_ids=torch.tensor(batch, device=device), use_cache=False)
                batches += 1
                tokens += sum(len(w) for w in batch)
    finally:
        for handle in handles:
            handle.remove()
    layers = {name: _layer_stats(running[name], module.weight.detach(), top_channels)
              for name, module in linears.items() if name in running}
    worst = sorted(layers, key=lambda n: -(layers[n]["outlier_ratio"] or 0.0))
    return {
        "layers": layers,
        "worst": worst[:10],
        "batches": batches,
        "batch_size": batch_size,
        "tokens": tokens,
        "suggestion": suggest_recipe(layers),
        "thresholds": {"high": HIGH_OUTLIER_RATIO, "moderate": MODERATE_OUTLIER_RATIO},
    }


def _batches(windows: list[list[int]], size: int):
    """Windows of the same length together (no padding to distort the statistics), at most `size` at a time."""
    by_len: dict[int, list[list[int]]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    for group in by_len.values():
        for i in range(0, len(group), size):
            yield group[i : i + size]


def _layer_stats(channel, weight, top_channels: int) -> dict:
    absmax = float(channel.max())
    median = float(channel.median())
    ratio = absmax / median if median > 0 else None
    top = channel.topk(min(top_channels, channel.numel()))
    w = weight.float()
    return {
        "in_features": channel.numel(),
        "input_absmax": absmax,
        "input_channel_median": median,
        "outlier_ratio": ratio if ratio is None or math.isfinite(ratio) else None,
        "top_channels": [int(i) for i in top.indices],
        "top_channel_absmax": [float(v) for v in top.values],
        "weight_min": float(w.min()),
        "weight_max": float(w.max()),
        "weight_absmax": float(w.abs().max()),
    }


def suggest_recipe(layers: dict) -> dict:
    ratios = {n: s["outlier_ratio"] for n, s in layers.items() if s["outlier_ratio"] is not None}
    if not ratios:
        return {"recipe": "w4a16-gptq", "alternatives": [], "max_outlier_ratio": None,
                "reason": "no activation statistics could be measured; GPTQ is the safe default"}
    worst = max(ratios, key=ratios.get)
    peak = ratios[worst]
    high = sum(r >= HIGH_OUTLIER_RATIO for r in ratios.values())
    if peak >= HIGH_OUTLIER_RATIO:
        recipe, alternatives = "w4a16-awq", ["w8a8-int8"]
        reason = (f"{high} of {len(ratios)} layers have activation outliers ≥ {HIGH_OUTLIER_RATIO:g}× their median "
                  f"channel (worst {worst}: {peak:.1f}×): AWQ protects the weight channels they multiply; to "
                  "quantize activations too, w8a8-int8 (SmoothQuant migrates the outliers into the weights)")
    elif peak >= MODERATE_OUTLIER_RATIO:
        recipe, alternatives = "w4a16-gptq", ["w4a16-awq", "w8a8-int8"]
        reason = (f"moderate activation outliers (worst {worst}: {peak:.1f}×): GPTQ's error compensation "
                  "handles them for weight-only INT4")
    else:
        recipe, alternatives = "w4a16-gptq", ["w4a16-rtn", "w8a8-int8"]
        reason = (f"activations are flat (worst {worst}: {peak:.1f}×, under {MODERATE_OUTLIER_RATIO:g}×): no need "
                  "for AWQ or SmoothQuant; GPTQ still corrects the weights' rounding error, and round-to-nearest "
                  "needs no calibration at all")
    return {"recipe": recipe, "alternatives": alternatives, "max_outlier_ratio": peak, "worst_layer": worst,
            "reason": reason}
