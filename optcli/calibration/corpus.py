"""The project's own calibration/evaluation corpus (package data under optcli/builtin/corpus/) and how
its text files split into documents. `heldout.txt` is for evaluation only: never calibrated on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from optcli.builtin import corpus_dir
from optcli.errors import UsageError

CALIBRATION_DIR = corpus_dir()
HELDOUT_FILE = "heldout.txt"  # evaluation only: never calibrated on
CODE_SEPARATOR = "<|doc|>"  # code has blank lines, so code.txt separates documents with this line


def split_documents(text: str, separator: str | None = None) -> list[str]:
    """Documents are separated by blank lines, or by lines equal to `separator` when given."""
    if separator:
        parts = "\n".join(line if line.strip() != separator else "\x00" for line in text.splitlines()).split("\x00")
    else:
        parts = text.replace("\r\n", "\n").split("\n\n")
    return [p.strip("\n") for p in parts if p.strip()]


def read_documents(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    separator = CODE_SEPARATOR if any(line.strip() == CODE_SEPARATOR for line in text.splitlines()) else None
    return split_documents(text, separator)


def calibration_documents(include_heldout: bool = False) -> Iterator[str]:
    """The project's own mixed-domain corpus (prose, dialogue, code, numbers)."""
    files = sorted(CALIBRATION_DIR.glob("*.txt"))
    if not files:
        raise UsageError(f"built-in calibration corpus not found in {CALIBRATION_DIR}")
    for path in files:
        if path.name == HELDOUT_FILE and not include_heldout:
            continue
        yield from read_documents(path)


def heldout_text() -> str:
    return "\n\n".join(read_documents(CALIBRATION_DIR / HELDOUT_FILE))
