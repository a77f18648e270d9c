"""`CalibrationOptions`: how `optcli calibrate` builds a set and what it reports beside it, each field declared
with its flag and help (`config.option`), so `cli/flags.py` makes the command's options from them."""

from __future__ import annotations

from dataclasses import dataclass

from optcli.config import option


@dataclass(frozen=True)
class CalibrationOptions:
    samples: int = option(128, "--samples", min=1, help="Windows to pick.")
    seq_len: int = option(512, "--seq-len", min=8, help="Tokens per window.")
    seed: int = option(0, "--seed", help="Seed of the window choice.")
    text_field: str | None = option(None, "--text-field", help="Row field holding the text (default: text).")
    chat_template: bool = option(False, "--chat-template",
                                 help="Render OpenAI-style 'messages' rows with the model's chat template.")
    strict: bool = option(False, "--strict", help="Exit 2 when the source has fewer windows than --samples.")
    stats: bool = option(False, "--stats", help=(
        "Activation-outlier report per linear layer (stats.json) and a recipe suggestion."))
    sensitivity: bool = option(False, "--sensitivity", help=(
        "Per-layer KLD of quantizing each layer alone at W4A16 (sensitivity.json, sensitivity.png): what "
        "auto:BITS spends by."))
    force: bool = option(False, "--force", help="Replace --out if it exists.")
