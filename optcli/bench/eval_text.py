"""The text accuracy is scored on: `--eval-text`, else the builtin corpus's held-out split."""

from __future__ import annotations

from pathlib import Path

from optcli.calibration.corpus import heldout_text
from optcli.errors import UsageError


def read_eval_text(path: Path | None) -> str:
    """A file that cannot be scored is exit 2 naming it (as calibrate names a bad source), not a decoder's error."""
    if path is None:
        return heldout_text()
    if not path.is_file():
        raise UsageError(f"--eval-text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--eval-text {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start})") from None
    except OSError as exc:
        raise UsageError(f"--eval-text {path}: cannot read ({exc.strerror or exc})") from None
    if not text.strip():
        raise UsageError(f"--eval-text {path}: no text to score (the file is empty or only whitespace)")
    return text
