"""Which layers an artifact's accuracy loss comes from (`optcli profile --per-layer`).

For every linear layer whose weight the artifact changed, the source model runs with that one layer's
weight replaced by the artifact's (dequantized: the very values the artifact computes with), and the mean
per-token KL(source || that) on the evaluation text is its blame; the shares say which few layers
account for most of the loss. `joint_kld` (every changed layer at once) shows how far the parts' sum is
from the whole. The measuring loop is the sensitivity report's (`calibration/sensitivity.py`), so both
read on one scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from optcli.calibration.corpus import heldout_text
from optcli.calibration.sensitivity import KldProbe, batches, quantizable_layers, swapped_klds
from optcli.checkpoints.resolve import load_model, resolve_model
from optcli.errors import UsageError

WINDOW = 256
MAX_TOKENS = 4096


def blame_baseline(model: str, baseline: str | None) -> str:
    """The model to blame against: --baseline, else the source an optcli artifact names; exit 2 without one."""
    if baseline:
        return baseline
    manifest = Path(model) / "optcli.json"
    if manifest.is_file():
        source = (json.loads(manifest.read_text()).get("source") or {})
        spec = source.get("path") or source.get("spec")
        if spec:
            return spec
    raise UsageError(f"--per-layer: {model} is not an optcli artifact; pass --baseline MODEL (its unquantized source)")


def _same(theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    """Equal up to the artifact's 16-bit storage (an fp32 source saved as bf16 is not quantized)."""
    return any(torch.equal(theirs.float(), ours.to(dtype).float()) for dtype in (ours.dtype, torch.bfloat16, torch.float16))


def per_layer_blame(model: str, baseline: str, eval_text: Path | None = None, max_tokens: int = MAX_TOKENS) -> dict:
    """Rank the artifact's changed layers by the KLD each causes alone against the baseline."""
    from optcli.engine.loading.state_dict import load_dense_state_dict

    source, tokenizer = load_model(resolve_model(baseline))
    artifact = load_dense_state_dict(resolve_model(model).path)
    layers = quantizable_layers(source)
    changed = {}
    for name, module in layers.items():
        theirs = artifact.get(f"{name}.weight")
        if theirs is not None and theirs.shape == module.weight.shape and not _same(theirs, module.weight.data):
            changed[name] = theirs.to(module.weight.dtype)
    text = eval_text.read_text(encoding="utf-8") if eval_text is not None else heldout_text()
    ids = tokenizer(text, verbose=False).input_ids[:max_tokens]
    windows = [ids[i : i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)] or [ids]
    probe = KldProbe(source, batches(windows, 8, max_tokens))
    klds = swapped_klds(probe, ((n, "artifact", lambda _w, n=n: changed[n]) for n in changed))
    with torch.no_grad():
        saved = {n: layers[n].weight.data.clone() for n in changed}
        try:
            for n in changed:
                layers[n].weight.data.copy_(changed[n])
            joint = probe.kld()
        finally:
            for n in changed:
                layers[n].weight.data.copy_(saved[n])
    total = sum(klds.values())
    rows = sorted(({"layer": n, "kld": k, "share": k / total if total > 0 else 0.0} for (n, _), k in klds.items()),
                  key=lambda r: -r["kld"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return {"model": model, "baseline": baseline, "tokens": probe.tokens, "joint_kld": joint,
            "total_kld_alone": total, "layers_changed": len(changed), "layers_unchanged": len(layers) - len(changed),
            "method": "the artifact's dequantized weight in one layer at a time, every other layer the baseline's; "
                      "mean per-token KL(baseline || that), in nats",
            "layers": rows}
