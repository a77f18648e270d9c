"""The default calibration set (`calibration_data/` at the top of the repository, shipped in the wheel) and
how its text files split into documents. `calibration_data/manifest.json` names each file's role: `calibration`
files are the default set, in the manifest's (sorted) order; the `heldout` file is for evaluation only,
never calibrated on."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

from optcli.builtin import calibration_data_dir
from optcli.errors import UsageError

CALIBRATION_DIR = calibration_data_dir()
MANIFEST = "manifest.json"
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


@functools.cache
def manifest() -> dict:
    """`calibration_data/manifest.json`: the files of the set, each with its role, document count and sha256."""
    try:
        return json.loads((CALIBRATION_DIR / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"built-in calibration set unreadable ({CALIBRATION_DIR / MANIFEST}: {exc})") from None


def calibration_files(include_heldout: bool = False) -> list[Path]:
    """The default calibration set's files in the manifest's order (and the held-out one where asked)."""
    roles = ("calibration", "heldout") if include_heldout else ("calibration",)
    return [CALIBRATION_DIR / f["file"] for f in manifest()["files"] if f["role"] in roles]


def calibration_documents(include_heldout: bool = False) -> Iterator[str]:
    """The project's own mixed-domain corpus (prose, dialogue, code, numbers)."""
    for path in calibration_files(include_heldout):
        yield from read_documents(path)


def heldout_text() -> str:
    (heldout,) = [CALIBRATION_DIR / f["file"] for f in manifest()["files"] if f["role"] == "heldout"]
    return "\n\n".join(read_documents(heldout))
