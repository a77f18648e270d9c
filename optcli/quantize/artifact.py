"""Artifact directories: written atomically (a run killed at any point leaves at most a `.tmp-*`
sibling, never a half-written `--out`, and the next run removes it) and measured."""

from __future__ import annotations

from pathlib import Path

# The writer lives in optcli.util.fs (shared with calibrate, convert and the report); these names stay
# importable from here for existing callers.
from optcli.util.fs import atomic_directory, check_out_dir, sweep_stale_temporaries

__all__ = ["atomic_directory", "check_out_dir", "directory_weight_bytes", "sweep_stale_temporaries"]


def directory_weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
