"""Mixed precision under a bit budget: `--recipe auto:BITS`.

Each quantizable layer gets a rung of the ladder (`calibration/sensitivity.py` LADDER, cheapest first):
W4A16 g128 -> 4-bit with a zero point per group (g128, g64, g32; scales by llm-compressor's "mse"
observer) -> W8A16 -> bf16. Everything starts at W4A16; then, greedily, the upgrade (to any rung above,
so a layer may skip rungs) that saves the most KLD per extra bit is taken while the average stays within
the budget. KLD saved is the sensitivity report's "KLD of that layer alone", summed over the layers that
move together (KLD is close to additive for small errors; the report's `joint_kld` says how close on the
model at hand). The 4-bit rungs between W4A16 and W8A16 matter where sensitivity is flat (stories260K):
there a few more bits for every layer buy more than 8 bits for a few.

Layers move in the engine's fused groups: q/k/v run as one matmul and gate/up as another, and a fused
matmul whose parts differ in format falls back to a dense weight, so a group always shares one rung
and every matmul keeps its own kernel.

The budget counts bits per weight over the quantizable linear layers (the decoder's q/k/v/o and MLP
projections), as stored: the integers plus each group's bf16 scale and packed zero point (W4A16 g128 =
4 + 16/128 = 4.125, zero point g32 = 4 + 20/32 = 4.625, W8A16 = 8 + 16/in_features, bf16 = 16), and the
padding of the int32 words they are packed in (`Rung.stored_bits`: the artifact's bytes, exactly). The
embeddings and the output head are kept in bf16 by every recipe, so they are reported beside it
(`bits_per_weight_all`: every weight of the model, the tied head counted once, as stored) rather than
spent from it: counted in, they would put the floor of a small model above 5 bits.

The result is an ordinary recipe with one llm-compressor config group per rung, written next to the
artifact as `recipe.yaml` so the same allocation can be rerun or edited.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optcli.errors import UsageError
from optcli.quantize.recipes import Recipe, load_recipe

AUTO = "auto:"
MIN_BITS, MAX_BITS = 4.0, 16.0
BASE_RECIPE = "w4a16-gptq"  # the rounding (GPTQ), its tunables and calibration needs
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}
SENSITIVITY_FILE = "sensitivity.json"


def parse_budget(name: str) -> float | None:
    """The BITS of `auto:BITS`, None for any other recipe name; a bad BITS is a usage error."""
    if not name.startswith(AUTO):
        return None
    text = name[len(AUTO):]
    try:
        bits = float(text)
    except ValueError:
        raise UsageError(f"recipe '{name}': BITS must be a number of bits per weight, e.g. auto:4.5") from None
    if not (math.isfinite(bits) and MIN_BITS <= bits <= MAX_BITS):
        raise UsageError(f"recipe '{name}': BITS must be from {MIN_BITS:g} to {MAX_BITS:g} (the ladder from W4A16 "
                         "g128 to bf16 spends 4.125 to 16 bits per weight)")
    return bits


def auto_recipe(name: str) -> Recipe:
    """`auto:BITS` as a recipe: GPTQ's settings, the budget, and no allocation yet (made per model)."""
    bits = parse_budget(name)
    base = load_recipe(BASE_RECIPE)
    return base.model_copy(update={
        "name": f"{AUTO}{bits:g}",
        "description": f"Mixed precision within {bits:g} bits per weight: each layer W4A16 g128, 4-bit with zero "
                       "points and finer groups, W8A16 or bf16, chosen by KLD saved per extra bit (GPTQ rounding).",
        "scheme": "mixed",
        "indivisible": "channel",  # a ragged layer's alternative to W4A16 per channel is a rung up, chosen here
        "budget_bits": bits,
        "source": name,
    })


@dataclass
class Allocation:
    budget_bits: float
    choice: dict[str, str]  # layer -> rung name
    reasons: dict[str, str]
    bits_per_weight: float
    floor_bits: float
    params: int
    predicted_kld: float  # sum over layers of the KLD alone at the chosen rung
    steps: list[dict] = field(default_factory=list)


def _units(rows: list[dict]) -> dict[str, list[dict]]:
    units: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["layer"]):
        parent, _, leaf = row["layer"].rpartition(".")
        units.setdefault(f"{parent}.{FUSED.get(leaf, leaf)}", []).append(row)
    return units


def allocate(report: dict, budget: float) -> Allocation:
    """Greedy by KLD saved per extra bit, from every unit at the first rung up to the budget."""
    from optcli.calibration.sensitivity import LADDER

    units = _units(report["layers"])
    params = sum(r["params"] for r in report["layers"])

    def bits(unit: str, level: int) -> float:
        return sum(LADDER[level].stored_bits(r["params"] // r["in_features"], r["in_features"]) for r in units[unit])

    def kld(unit: str, level: int) -> float:
        return sum(r["kld_by_scheme"][LADDER[level].name] for r in units[unit])

    level = dict.fromkeys(units, 0)
    spent = sum(bits(u, 0) for u in units)
    limit = budget * params
    if spent > limit * (1 + 1e-9):
        raise UsageError(f"recipe 'auto:{budget:g}': below this model's floor of {spent / params:.3f} bits per weight "
                         f"(every layer at {LADDER[0].name}); use auto:{math.ceil(spent / params * 100) / 100:g} or more")
    steps: list[dict] = []
    while True:
        best = None
        for unit, at in level.items():
            for up in range(at + 1, len(LADDER)):
                extra = bits(unit, up) - bits(unit, at)
                saved = kld(unit, at) - kld(unit, up)
                if spent + extra > limit or saved <= 0:
                    continue
                ratio = saved / extra if extra > 0 else math.inf  # a rung no dearer for this width: free
                if best is None or ratio > best[0]:
                    best = (ratio, unit, up, extra, saved)
        if best is None:
            break
        ratio, unit, up, extra, saved = best
        steps.append({"unit": unit, "from": LADDER[level[unit]].name, "to": LADDER[up].name, "kld_saved": saved,
                      "extra_bytes": round(extra / 8), "kld_saved_per_mib": ratio * 8 * 2**20})
        level[unit] = up
        spent += extra
    choice, reasons = _explain(units, level, steps)
    predicted = sum(kld(u, at) for u, at in level.items())
    return Allocation(budget, choice, reasons, spent / params, sum(bits(u, 0) for u in units) / params, params,
                      predicted, steps)


def _explain(units: dict[str, list[dict]], level: dict[str, int], steps: list[dict]) -> tuple[dict, dict]:
    from optcli.calibration.sensitivity import LADDER

    taken = {s["unit"]: (n, s) for n, s in enumerate(steps, 1)}
    last = steps[-1]["kld_saved_per_mib"] if steps else None
    choice, reasons = {}, {}
    for unit, rows in units.items():
        rung = LADDER[level[unit]]
        together = f" (with {', '.join(r['layer'].rsplit('.', 1)[1] for r in rows)}: one fused matmul)" if len(rows) > 1 else ""
        alone = sum(r["kld_by_scheme"][LADDER[0].name] for r in rows)
        if unit in taken:
            n, step = taken[unit]
            why = (f"{rung.name}: KLD alone {alone:.3g} at {LADDER[0].name}; upgrade {n} of {len(steps)}, saving "
                   f"{step['kld_saved']:.3g} nats for {step['extra_bytes']} extra bytes{together}")
        else:
            floor = "" if last is None else f" (upgrades taken saved down to {last:.3g} nats per MiB)"
            why = (f"{rung.name}: KLD alone {alone:.3g}; no upgrade that saves more per bit fits the budget{floor}"
                   f"{together}")
        for row in rows:
            choice[row["layer"]] = rung.name
            reasons[row["layer"]] = why
    return choice, reasons


def weight_args(rung, in_features: int) -> dict[str, Any]:
    """The rung as compressed-tensors quantization args for a layer this wide: its group, or one scale per
    row where the width takes no group of it."""
    args = {"num_bits": rung.bits, "type": "int", "symmetric": rung.symmetric}
    if rung.observer != "minmax":
        args["observer"] = rung.observer
    group = rung.group_for(in_features)
    if group < in_features:
        return {**args, "strategy": "group", "group_size": group}
    return {**args, "strategy": "channel"}


def concrete_recipe(recipe: Recipe, allocation: Allocation, widths: dict[str, int]) -> Recipe:
    """The auto recipe with its allocation: one GPTQ config group per rung (and per group size where a
    width takes another), bf16 layers ignored."""
    from optcli.calibration.sensitivity import LADDER, RUNGS

    base = dict(recipe.llmcompressor["quant_stage"]["quant_modifiers"]["GPTQModifier"])
    for key in ("targets", "scheme", "config_groups"):
        base.pop(key, None)
    groups: dict[str, dict] = {}
    for name, rung_name in sorted(allocation.choice.items()):
        rung = RUNGS[rung_name]
        if rung.bits >= 16:
            continue
        args = weight_args(rung, widths[name])
        key = f"group_{rung.name.lower().replace('-', '_')}"
        if args.get("group_size", None) != rung.group:
            key += f"_{args.get('group_size', 'channel')}"
        groups.setdefault(key, {"targets": [], "weights": args})["targets"].append(name)
    kept = sorted(n for n, c in allocation.choice.items() if LADDER[-1].name == c)
    update: dict[str, Any] = {"budget_bits": None, "ignore": sorted(set(recipe.ignore) | set(kept)),
                              "description": f"{recipe.description} Allocation for the budget of "
                                             f"{allocation.budget_bits:g} bits ({allocation.bits_per_weight:.3f} spent)."}
    if groups:
        update["llmcompressor"] = {"quant_stage": {"quant_modifiers": {"GPTQModifier": {**base, "config_groups": groups}}}}
    else:  # every layer kept in bf16: nothing for llm-compressor to do
        update.update(backend="none", llmcompressor=None)
    return recipe.model_copy(update=update)


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as a file `optcli quantize --recipe FILE` takes back unchanged."""
    import yaml

    data = recipe.model_dump(exclude={"source", "budget_bits"})
    return yaml.safe_dump(data, sort_keys=False, width=120)


def reuse_sensitivity(calibration: Path | None, source_hashes: dict, scheme: str) -> dict | None:
    """A `calibrate --sensitivity` report in the calibration set, when it was measured on these weights."""
    from optcli.calibration.sensitivity import RUNGS

    path = Path(calibration) / SENSITIVITY_FILE if calibration is not None else None
    if path is None or not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = report.get("source_weights") == source_hashes and report.get("scheme") == scheme
    # a report from before a rung joined the ladder is measured again
    return report if ok and set(RUNGS) <= set(report["layers"][0]["kld_by_scheme"]) else None


def plan_mixed(model, recipe: Recipe, calib, calibration: Path | None, source) -> tuple[Recipe, dict, dict]:
    """Measure (or reuse) the sensitivity, allocate, and return the concrete recipe, the manifest's
    `allocation` section and each layer's choice and reason (for the manifest's `layers`)."""
    from optcli.calibration.sensitivity import LADDER, measure_sensitivity
    from optcli.checkpoints.resolve import weight_hashes

    hashes = weight_hashes(source.path)
    report = reuse_sensitivity(calibration, hashes, LADDER[0].name)
    reused = report is not None
    if report is None:
        report = measure_sensitivity(model, calib.input_ids)
    allocation = allocate(report, recipe.budget_bits)
    concrete = concrete_recipe(recipe, allocation, {r["layer"]: r["in_features"] for r in report["layers"]})
    outside = _outside_weights(model)
    all_bits = (allocation.bits_per_weight * allocation.params + 16 * outside) / (allocation.params + outside)
    counts: dict[str, int] = {}
    for rung in allocation.choice.values():
        counts[rung] = counts.get(rung, 0) + 1
    section = {
        "budget_bits": allocation.budget_bits,
        "bits_per_weight": round(allocation.bits_per_weight, 4),
        "floor_bits": round(allocation.floor_bits, 4),
        "bits_per_weight_all": round(all_bits, 4),
        "counted": "budget: bits per weight over the quantizable linear layers as stored, bf16 scales, packed "
                   "zero points and the int32 packing's padding included (W4A16 g128 4.125, 4-bit zero point group g "
                   "4 + 20/g, W8A16 8 + 16/in_features, bf16 16, before padding); bits_per_weight_all adds the "
                   "embeddings and an untied head at 16 bits (a tied head is the embedding, counted once)",
        "quantizable_params": allocation.params,
        "other_params": outside,
        "layers_per_scheme": counts,
        "predicted_kld": allocation.predicted_kld,
        "upgrades": allocation.steps,
        "sensitivity": {"reused": reused, "tokens": report["tokens"], "total_kld_alone": report["total_kld_alone"],
                        "joint_kld": report.get("joint_kld"), "estimated": report.get("estimated", [])},
        "recipe_file": "recipe.yaml",
    }
    layers = {name: {"precision": rung, "reason": allocation.reasons[name]} for name, rung in allocation.choice.items()}
    return concrete, section, layers


def _outside_weights(model) -> int:
    """Weights outside the quantizable layers: the embeddings, and the head when it is not tied to them."""
    embedding = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)
    return embedding.numel() + (head.numel() if head is not None and head is not embedding else 0)
