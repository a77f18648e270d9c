"""llm-compressor backend: GPTQ, AWQ, SmoothQuant, FP8, SparseGPT through `oneshot`.

We build the modifiers from the recipe's llm-compressor block (validated by llm-compressor
itself), apply the recipe's ignore list and tunables, resolve per-layer group sizes, and let
oneshot's sequential pipeline calibrate layer by layer so models larger than memory still fit.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from pydantic import ValidationError

from optcli.errors import UsageError
from optcli.quantize.layout import resolve_group_layout
from optcli.quantize.lc_patches import allow_cpu_only_calibration, awq_skips_unquantized_balance_layers


def parse_modifiers(recipe) -> list:
    """The recipe's llm-compressor block as modifiers; its mistakes become one-line usage errors."""
    from llmcompressor.recipe import Recipe as LcRecipe

    where = f"{recipe.source or recipe.name}: llmcompressor"
    try:
        return LcRecipe.from_dict(recipe.llmcompressor).modifiers
    except ValidationError as exc:
        err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        field = ".".join(str(p) for p in err["loc"])
        allowed = ""
        if err["type"] == "extra_forbidden":
            allowed = f" (allowed: {', '.join(_fields_of(exc.title))})"
        raise UsageError(f"{where}: {exc.title}.{field}: {err['msg']}{allowed}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UsageError(f"{where}: {str(exc).splitlines()[0]}") from None


def build_modifiers(recipe, model: torch.nn.Module) -> tuple[list, dict[str, str]]:
    """Recipe → llm-compressor modifiers, with our ignore list, tunables and layer layout applied."""
    from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin

    modifiers = parse_modifiers(recipe)
    unused = set(recipe.tunables)
    for modifier in modifiers:
        for key, value in recipe.tunables.items():
            if key in type(modifier).model_fields:
                setattr(modifier, key, value)
                unused.discard(key)
        if isinstance(modifier, QuantizationMixin):
            modifier.ignore = sorted(set(modifier.ignore) | set(recipe.ignore) | set(gate_linears(model)))
            modifier._resolved_config = None  # cached at construction; must see the new fields
    if unused:
        names = ", ".join(type(m).__name__ for m in modifiers)
        raise UsageError(f"{recipe.source or recipe.name}: tunables {sorted(unused)} match no field of {names}")
    decisions: dict[str, str] = {}
    for modifier in modifiers:
        if isinstance(modifier, QuantizationMixin):
            decisions.update(resolve_group_layout(model, modifier, recipe.indivisible))
    return modifiers, decisions


def router_gates(model: torch.nn.Module) -> dict[str, str]:
    """MoE routers, which no recipe quantizes: their logits choose which experts run, so rounding error there
    changes the computation. transformers' routers are not Linear modules, so no Linear target matches them;
    a shared expert's gate is a Linear, which `build_modifiers` adds to every ignore list (`gate_linears`)."""
    found = {name: "unquantized (router gate)" for name, module in model.named_modules()
             if type(module).__name__.endswith("Router")}
    return found | {name: "unquantized (shared-expert gate)" for name in gate_linears(model)}


def gate_linears(model: torch.nn.Module) -> list[str]:
    """Linear layers that gate experts rather than compute features: Qwen2-MoE's `shared_expert_gate`, one
    output that scales the shared expert per token (llm-compressor's own MoE examples ignore it too)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] == "shared_expert_gate"]


def _fields_of(modifier_name: str) -> list[str]:
    from llmcompressor.modifiers.factory import ModifierFactory

    ModifierFactory.refresh()
    for registry in (ModifierFactory._main_registry, ModifierFactory._experimental_registry):
        if modifier_name in registry:
            return [f for f in registry[modifier_name].model_fields if not f.endswith("_")]
    return []


@contextlib.contextmanager
def _observe_progress(on_layer_done: Callable[[], None] | None, losses: dict):
    """Hook llm-compressor's lifecycle: a callback per calibrated layer, and GPTQ's per-layer loss."""
    from llmcompressor.core.session_functions import LifecycleCallbacks
    from llmcompressor.utils.metric_logging import CompressionLogger

    original_epoch_end = LifecycleCallbacks.sequential_epoch_end.__func__
    original_set_results = CompressionLogger.set_results

    def epoch_end(cls, *args, **kwargs):
        result = original_epoch_end(cls, *args, **kwargs)
        if on_layer_done is not None:
            on_layer_done()
        return result

    def set_results(self, name=None, loss=None):
        if loss is not None:
            losses[self.module] = (name, loss)
        return original_set_results(self, name=name, loss=loss)

    LifecycleCallbacks.sequential_epoch_end = classmethod(epoch_end)
    CompressionLogger.set_results = set_results
    try:
        yield
    finally:
        LifecycleCallbacks.sequential_epoch_end = classmethod(original_epoch_end)
        CompressionLogger.set_results = original_set_results


def quantize_llmcompressor(model, tokenizer, recipe, calib, on_layer_done=None) -> dict[str, Any]:
    """Run oneshot in place on `model`; return per-layer decisions (and GPTQ losses) for the manifest."""
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    from datasets import Dataset
    from llmcompressor import oneshot

    allow_cpu_only_calibration()
    awq_skips_unquantized_balance_layers()
    # MoE experts as one Linear each, as oneshot would make them itself: the layout decisions must see them
    from llmcompressor.modeling.moe.linearize import linearize_moe

    linearize_moe(model)
    modifiers, decisions = build_modifiers(recipe, model)
    decisions.update(router_gates(model))
    kwargs: dict[str, Any] = {}
    if calib is not None:
        dataset = Dataset.from_dict(
            {"input_ids": calib.input_ids, "attention_mask": [[1] * len(ids) for ids in calib.input_ids]}
        )
        kwargs.update(
            dataset=dataset,
            num_calibration_samples=len(calib),
            max_seq_length=max(len(ids) for ids in calib.input_ids),
            shuffle_calibration_samples=False,
        )
    losses: dict = {}
    with contextlib.redirect_stdout(sys.stderr), _observe_progress(on_layer_done, losses):
        oneshot(model=model, processor=tokenizer, recipe=modifiers, **kwargs)
    names = {module: name for name, module in model.named_modules()}
    layers: dict[str, Any] = {name: {"scheme": decision} for name, decision in decisions.items()}
    for module, (algorithm, loss) in losses.items():
        layers.setdefault(names.get(module, "?"), {})[f"{algorithm.lower()}_loss"] = round(loss, 6)
    return layers
