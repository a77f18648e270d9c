"""Writing a generated YAML file (rules, a scaler): whole or not at all, and over an existing file only
when it is one optcli generated (its first line is our header), so `--out kpi.yaml` cannot eat the input."""

from __future__ import annotations

import os
from pathlib import Path

from optcli.errors import UsageError
from optcli.util.fs import check_out_file


def _starts_with(header: str):
    def ours(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.readline().startswith(header)
        except (OSError, UnicodeDecodeError):
            return False

    return ours


def check_generated_out(path: Path, flag: str, kind: str, header: str) -> None:
    """Before any work: exit 2 if `path` cannot be written or holds something else than what we generate."""
    check_out_file(Path(path), flag, kind, _starts_with(header))


def write_generated(path: Path, text: str, flag: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"{flag} {path}: cannot write ({e.strerror or e})") from None
