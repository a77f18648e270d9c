"""Per-layer sensitivity: what quantizing one layer alone costs in KL divergence against the source.

`optcli calibrate --sensitivity` and `quantize --recipe auto:BITS` both start here. The source's
log-probs on the calibration windows are computed once and kept; then, layer by layer, the layer's
weight is swapped for its round-to-nearest value under a rung of the ladder (`LADDER`: W4A16 g128,
4-bit with zero points and finer groups, W8A16), the same batches run again, and the mean per-token
KL(source || quantized) is recorded; the weight is put back before the next layer. Round-to-nearest is
what "quantizing that layer alone" means here: GPTQ compensates each layer's rounding against its own
inputs, which lowers every layer's cost but is far slower to repeat per layer, so the allocation ranks by
round-to-nearest and the artifact is then made with GPTQ (tests/calibration/test_sensitivity.py checks
the ranking against measurement: the top tenth of layers cost more together than the bottom half).
Ranking by GPTQ instead (each layer's weight from a uniform GPTQ run at each rung, swapped in alone) was
tried on stories260K: it cost five GPTQ runs and gave an allocation no better on held-out text.

The model is any causal LM whose Linear layers carry the weights (transformers' Llama family is
what we run); it is left exactly as it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optcli.engine.quant.weights import Int4Weight, Int8Weight

SCALE_BITS = 16  # each group's (or row's) scale is stored in bf16 next to the integers
NOT_QUANTIZED = ("lm_head", "shared_expert_gate")  # the head and MoE gates: every recipe keeps them dense
MAX_TOKENS = 8192  # calibration tokens the measurement reads at most: enough to rank, cheap on a CPU


@dataclass(frozen=True)
class Rung:
    """One step of the precision ladder: `bits` per weight, `group` input channels per scale (None: a
    scale per output row), `symmetric` or with a zero point per group."""

    name: str
    bits: int
    group: int | None
    symmetric: bool = True
    observer: str = "minmax"  # llm-compressor's: "mse" searches a clipped range per group

    def group_for(self, in_features: int) -> int:
        """The group this rung gives a layer `in_features` wide: its own where it divides the width, else
        the smallest divisor of the width above it (stories260K's 172-wide MLP: 43 for group 32, 86 for
        64), else one scale per row."""
        if not self.group or in_features <= self.group:
            return in_features
        return next(g for g in range(self.group, in_features + 1) if in_features % g == 0)

    def bits_per_weight(self, in_features: int) -> float:
        """Storage per weight with its share of the scales (and zero points): 4 + 16/128 = 4.125 for
        W4A16 g128; a zero point adds `bits` per group (compressed-tensors packs them like the weights)."""
        if self.bits >= 16:
            return float(self.bits)
        per_group = SCALE_BITS + (0 if self.symmetric else self.bits)
        return self.bits + per_group / self.group_for(in_features)

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """The layer's bits as compressed-tensors stores them (`pack-quantized`): each row's integers packed
        into whole int32 words, a bf16 scale per group and row, and the zero points packed 32 bits at a time
        down the rows. Differs from `bits_per_weight` only by the words' padding (stories260K's 172-wide
        rows: 22 words for 172 nibbles)."""
        if self.bits >= 16:
            return self.bits * out_features * in_features
        groups = in_features // self.group_for(in_features)
        words = -(-in_features * self.bits // 32) * out_features
        zero_points = 0 if self.symmetric else -(-out_features * self.bits // 32) * groups
        return 32 * (words + zero_points) + SCALE_BITS * out_features * groups

    def layout(self, in_features: int) -> str:
        if self.bits >= 16:
            return "bf16"
        group = self.group_for(in_features)
        return ("per channel" if group == in_features else f"group {group}") + ("" if self.symmetric else ", zero point")

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """The layer's weight after round-to-nearest in this rung's format, back in float (the scales as
        this rung's observer picks them)."""
        if self.bits >= 16:
            return weight
        group = self.group_for(weight.shape[1])
        if self.bits == 4 and self.observer == "mse":
            return clipped_rtn4(weight, group, self.symmetric).to(weight.dtype)
        if self.bits == 4:
            return Int4Weight.rtn(weight, group, self.symmetric).dequantize().to(weight.dtype)
        if self.bits == 8 and self.symmetric:
            return Int8Weight.rtn(weight, act_quant=False).dequantize().to(weight.dtype)
        raise ValueError(f"no round-to-nearest for rung {self.name}")


def clipped_rtn4(weight: torch.Tensor, group: int, symmetric: bool, max_shrink: float = 0.2,
                 steps: int = 20, norm: float = 2.4) -> torch.Tensor:
    """4-bit round-to-nearest with each group's range shrunk by the factor (1 down to 1 - max_shrink) that
    minimises sum |error|^norm: what llm-compressor's "mse" observer does (same defaults), in float."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    lo, hi = w.amin(-1, keepdim=True).clamp_max(0), w.amax(-1, keepdim=True).clamp_min(0)
    best = best_err = None
    for step in range(steps + 1):
        shrink = 1 - max_shrink * step / steps
        if symmetric:
            scale = (torch.maximum(-lo, hi) * shrink / 7.5).clamp_min(1e-8)
            out = (w / scale).round().clamp(-8, 7) * scale
        else:
            scale = ((hi - lo) * shrink / 15).clamp_min(1e-8)
            zero = (-8 - lo * shrink / scale).round().clamp(-8, 7)
            out = ((w / scale).round() + zero).clamp(-8, 7).sub(zero) * scale
        err = (out - w).abs().pow(norm).sum(-1, keepdim=True)
        if best is None:
            best, best_err = out, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, out, best), torch.minimum(err, best_err)
    return best.reshape(n, k)


# The ladder, cheapest first (bits per weight never fall going up, whatever a layer's width). Between
# W4A16 and W8A16 sit 4-bit rungs with a zero point and finer groups: on a model whose sensitivity is
# flat, a few more bits for every layer buy more than 8 bits for a few (stories260K, held-out KLD of
# GPTQ with every layer at one rung: W4A16 0.100, zero point 0.081, zero point + group 32 0.066).
# All of them run on the engine's int4 kernels; group 32 on torch's (the others need groups of 64).
W4A16 = Rung("W4A16", 4, 128)
W4A16_ZP = Rung("W4A16-ZP", 4, 128, symmetric=False, observer="mse")
W4A16_G64_ZP = Rung("W4A16-G64-ZP", 4, 64, symmetric=False, observer="mse")
W4A16_G32_ZP = Rung("W4A16-G32-ZP", 4, 32, symmetric=False, observer="mse")
W8A16 = Rung("W8A16", 8, None)
BF16 = Rung("BF16", 16, None)
LADDER = (W4A16, W4A16_ZP, W4A16_G64_ZP, W4A16_G32_ZP, W8A16, BF16)  # the last rung is the source precision
RUNGS = {r.name: r for r in LADDER}


def quantizable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linear layers a recipe quantizes, in model order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in NOT_QUANTIZED}


def batches(windows: list[list[int]], batch_size: int, max_tokens: int = MAX_TOKENS) -> list[torch.Tensor]:
    """Equal-length windows stacked `batch_size` at a time, at most `max_tokens` tokens in all."""
    kept, total = [], 0
    for window in windows:
        if total + len(window) > max_tokens and kept:
            break
        kept.append(window[:max_tokens])
        total += len(kept[-1])
    by_len: dict[int, list[list[int]]] = {}
    for window in kept:
        by_len.setdefault(len(window), []).append(window)
    return [torch.tensor(group[i : i + batch_size]) for group in by_len.values() for i in range(0, len(group), batch_size)]


def _decoder_blocks(model) -> tuple[torch.nn.Module, torch.nn.ModuleList] | None:
    """The inner model and its decoder blocks (transformers' `model.model.layers`), or None."""
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    return (inner, blocks) if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 1 else None


class KldProbe:
    """The source's log-probs on fixed batches, computed once; `kld()` scores the model as it is now.

    A layer in decoder block i changes nothing before block i, so the probe also keeps each block's
    input hidden states and `kld(start=i)` runs only blocks i.. (through `inputs_embeds`): half the work
    on average. The shortcut is used only where it reproduces the source's own logits (it would not
    where a model scales its embeddings inside forward, e.g. Gemma)."""

    def __init__(self, model, token_batches: list[torch.Tensor]) -> None:
        self.model = model
        self.batches = token_batches
        self.tokens = sum(b.numel() for b in token_batches)
        self.decoder = _decoder_blocks(model)
        self.block_inputs: list[list[torch.Tensor]] = []
        self.source = [self._record(ids) for ids in token_batches]
        if self.decoder is not None and not self._shortcut_exact():
            self.decoder, self.block_inputs = None, []

    @torch.no_grad()
    def _record(self, ids: torch.Tensor) -> torch.Tensor:
        kept: list[torch.Tensor] = []
        handles = []
        if self.decoder is not None:
            def keep(_module, args, kwargs) -> None:
                kept.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

            handles = [b.register_forward_pre_hook(keep, with_kwargs=True) for b in self.decoder[1]]
        try:
            logprobs = self._run(ids)
        finally:
            for h in handles:
                h.remove()
        self.block_inputs.append(kept)
        return logprobs

    @torch.no_grad()
    def _run(self, ids: torch.Tensor, start: int = 0, batch: int = 0) -> torch.Tensor:
        if start == 0 or self.decoder is None:
            device = next(self.model.parameters()).device
            logits = self.model(ids.to(device)).logits
        else:
            inner, blocks = self.decoder
            inner.layers = torch.nn.ModuleList(blocks[start:])
            try:
                logits = self.model(inputs_embeds=self.block_inputs[batch][start]).logits
            finally:
                inner.layers = blocks
        return F.log_softmax(logits.float(), dim=-1).flatten(0, 1)

    def _shortcut_exact(self) -> bool:
        last = len(self.decoder[1]) - 1
        return bool(torch.allclose(self._run(self.batches[0], last, 0), self.source[0], atol=1e-4, rtol=1e-4))

    def block_of(self, module: torch.nn.Module) -> int:
        """The decoder block `module` sits in (0 without the shortcut: run the whole model)."""
        if self.decoder is None:
            return 0
        if not hasattr(self, "_blocks"):
            self._blocks = {id(m): i for i, block in enumerate(self.decoder[1]) for m in block.modules()}
        return self._blocks.get(id(module), 0)

    @torch.no_grad()
    def kld(self, start: int = 0) -> float:
        """Mean per-token KL(source || model now), in nats; `start`: first block that can differ."""
        total = 0.0
        for i, (ids, base) in enumerate(zip(self.batches, self.source, strict=True)):
            total += F.kl_div(self._run(ids, start, i), base, log_target=True, reduction="sum").item()
        return max(total / self.tokens, 0.0)


@torch.no_grad()
def swapped_klds(probe: KldProbe, candidates: Iterable[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]],
                 progress: Callable[[int, int], None] | None = None) -> dict[tuple[str, str], float]:
    """{(layer, label): KLD} with `make(weight)` in place of that one layer's weight, others untouched."""
    layers = dict(probe.model.named_modules())
    todo = list(candidates)
    out: dict[tuple[str, str], float] = {}
    for done, (name, label, make) in enumerate(todo, 1):
        weight = layers[name].weight
        original = weight.data.clone()
        try:
            weight.data.copy_(make(original))
            out[(name, label)] = probe.kld(probe.block_of(layers[name]))
        finally:
            weight.data.copy_(original)
        if progress is not None:
            progress(done, len(todo))
    return out


def measure_sensitivity(model, windows: list[list[int]], rungs: tuple[Rung, ...] = LADDER[:-1], *,
                        batch_size: int = 8, max_tokens: int = MAX_TOKENS, measure_all: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """The sensitivity report: every quantizable layer ranked by the KLD of quantizing it alone with the
    first rung (and its share of the sum), with each rung's KLD kept for the mixed-precision allocation.

    The other rungs are estimated unless `measure_all`: KLD is second order in a small weight error, so a
    layer's KLD at a rung is its measured W4A16 KLD times the ratio of the two roundings' squared error on
    that layer's own weight (checked against measurement in the tests: within 2x where it matters)."""
    probe = KldProbe(model, batches(windows, batch_size, max_tokens))
    layers = quantizable_layers(model)
    measured = rungs if measure_all else rungs[:1]
    klds = swapped_klds(probe, ((n, r.name, r.fake_quantize) for n in layers for r in measured), progress)
    scheme = rungs[0]
    total = sum(klds[(n, scheme.name)] for n in layers)
    rows = []
    for name, module in layers.items():
        by_scheme = {r.name: klds.get((name, r.name)) for r in rungs}
        for rung in rungs[1:]:
            if by_scheme[rung.name] is None:
                by_scheme[rung.name] = by_scheme[scheme.name] * _error_ratio(module.weight.data, rung, scheme)
        rows.append({
            "layer": name,
            "kld": by_scheme[scheme.name],
            "share": by_scheme[scheme.name] / total if total > 0 else 0.0,
            "params": module.weight.numel(),
            "in_features": module.in_features,
            "kld_by_scheme": by_scheme | {BF16.name: 0.0},
            "layout": {r.name: r.layout(module.in_features) for r in (*rungs, BF16)},
        })
    rows.sort(key=lambda r: -r["kld"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return {
        "scheme": scheme.name,
        "method": "round-to-nearest of one layer at a time, every other layer at source precision; "
                  "mean per-token KL(source || quantized) over the calibration tokens, in nats",
        "estimated": [] if measure_all else [r.name for r in rungs[1:]],
        "tokens": probe.tokens,
        "windows": sum(len(b) for b in probe.batches),
        "total_kld_alone": total,
        # all layers at the scheme together: how far the sum of the parts is from the whole
        "joint_kld": _joint_kld(probe, layers, scheme),
        "layers": rows,
    }


RATIO_ROWS = 512  # rows the error ratio reads at most: a 1B model's 8192-row MLP weight costs 10 s per rung whole


def _error_ratio(weight: torch.Tensor, fine: Rung, coarse: Rung) -> float:
    """Squared rounding error of `fine` over `coarse` on this weight, from evenly spaced rows when it is large
    (rows are rounded independently, so a sample of them estimates the whole)."""
    w = weight[:: max(1, weight.shape[0] // RATIO_ROWS)].float()
    coarse_err = (coarse.fake_quantize(w) - w).pow(2).sum().item()
    return (fine.fake_quantize(w) - w).pow(2).sum().item() / coarse_err if coarse_err > 0 else 0.0


@torch.no_grad()
def _joint_kld(probe: KldProbe, layers: dict[str, torch.nn.Linear], rung: Rung) -> float:
    originals = {n: m.weight.data.clone() for n, m in layers.items()}
    try:
        for name, module in layers.items():
            module.weight.data.copy_(rung.fake_quantize(originals[name]))
        return probe.kld()
    finally:
        for name, module in layers.items():
            module.weight.data.copy_(originals[name])
