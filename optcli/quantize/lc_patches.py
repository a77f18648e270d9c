"""Small upstream-style fixes to llm-compressor 0.14, applied once before a run.

Each patch wraps one method, keeps its behaviour wherever it already worked, and says why.
"""

from __future__ import annotations

import torch


def allow_cpu_only_calibration() -> None:
    """Make llm-compressor's activation cache skip memory pinning when there is no accelerator.

    AWQ pins cached activations for faster host-to-device copies; `Tensor.pin_memory()` raises
    "Cannot access accelerator device when none is available" on a CPU-only machine. Pinning is
    only an optimisation, so without an accelerator it is skipped (the upstream-style fix).
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    if getattr(IntermediatesCache, "_optcli_patched", False):
        return
    original = IntermediatesCache._pin_intermediate.__func__

    def pin_if_accelerator(cls, intermediate) -> None:
        if torch.accelerator.is_available():
            original(cls, intermediate)

    IntermediatesCache._pin_intermediate = classmethod(pin_if_accelerator)
    IntermediatesCache._optcli_patched = True


def awq_skips_unquantized_balance_layers() -> None:
    """Make AWQ drop smoothing mappings whose balance layers are all left unquantized.

    AWQ's scales only help the layers that get quantized; when a recipe leaves e.g. a ragged
    down_proj in full precision, llm-compressor still tries to search scales for the
    up_proj → down_proj mapping and divides by zero averaging no quantized weights.
    """
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if getattr(AWQModifier, "_optcli_patched", False):
        return
    original = AWQModifier._set_resolved_mappings

    def resolve_quantized_mappings(self, model) -> None:
        original(self, model)
        self._resolved_mappings = [
            mapping
            for mapping in self._resolved_mappings
            if any(getattr(getattr(layer, "quantization_scheme", None), "weights", None) for layer in mapping.balance_layers)
        ]

    AWQModifier._set_resolved_mappings = resolve_quantized_mappings
    AWQModifier._optcli_patched = True
