"""Per-layer group-size decisions for group-quantized schemes.

Stock W4A16 assumes every Linear's input width is a multiple of the group size (128). Real small
models break that: stories260K's layers are 64 wide (narrower than one group) and its MLP is 172
wide (a ragged last group). llm-compressor then crashes in the observer or refuses at start-up.
We decide per layer instead, and record each decision:
- width % group == 0 → keep the group scheme;
- width < group     → per-channel, which is exactly one (short) group per row;
- ragged            → the recipe's `indivisible` policy: per-channel, or leave unquantized.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.utils import match_named_modules


def resolve_group_layout(model: torch.nn.Module, modifier, policy: str) -> dict[str, str]:
    """Rewrite `modifier`'s config groups so every targeted layer gets a scheme it can take.

    Returns {layer name: decision}. Leaves modifiers without group-quantized weights untouched.
    """
    config = modifier.resolve_quantization_config()
    decisions: dict[str, str] = {}
    groups = {}
    extra_ignore: list[str] = []
    changed = False
    for group_name, scheme in config.config_groups.items():
        weights = scheme.weights
        matched = [
            (name, module)
            for name, module in match_named_modules(model, scheme.targets, config.ignore)
            if isinstance(module, torch.nn.Linear)
        ]
        if weights is None or weights.strategy != QuantizationStrategy.GROUP:
            groups[group_name] = scheme
            for name, _ in matched:
                decisions[name] = getattr(weights.strategy, "value", weights.strategy) if weights else "none"
            continue
        size = int(weights.group_size)
        fit, channel = [], []
        for name, module in matched:
            width = module.in_features
            if width % size == 0:
                fit.append(name)
                decisions[name] = f"group{size}"
            elif width < size or policy == "channel":
                channel.append(name)
                decisions[name] = "channel" + (f" (width {width} < group {size})" if width < size else f" (width {width} not a multiple of {size})")
            else:
                extra_ignore.append(name)
                decisions[name] = f"skipped (width {width} not a multiple of {size}: kept unquantized)"
        if not channel and not extra_ignore:
            groups[group_name] = scheme
            continue
        changed = True
        if fit:
            groups[group_name] = scheme.model_copy(update={"targets": fit})
        if channel:
            per_channel = weights.model_copy(update={"strategy": QuantizationStrategy.CHANNEL, "group_size": None})
            groups[f"{group_name}_channel"] = scheme.model_copy(update={"targets": channel, "weights": per_channel})
    if changed:
        modifier.scheme = None
        modifier.targets = sorted({t for s in groups.values() for t in s.targets})
        modifier.config_groups = groups
        modifier.ignore = list(config.ignore) + extra_ignore
        modifier._resolved_config = None  # llm-compressor caches the config it resolved at construction
    return decisions
