"""Atomic artifact directories: build in a hidden sibling, rename into place at the end.

A run killed at any point leaves at most a `.tmp-*` sibling, never a half-written `--out`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from optcli.errors import UsageError

_OWNER_FILE = ".optcli-owner-pid"  # lets a later run tell a crashed run's leftovers from a live run


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UsageError(f"output directory already exists: {out} (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path exists and is not a directory: {out}")


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes."""
    out = Path(out).absolute()
    check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    owner = tmp / _OWNER_FILE
    owner.write_text(str(os.getpid()))
    try:
        yield tmp
        owner.unlink()
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the artifact should not be
        if out.exists():  # --force: swap the old one out only once the new one is complete
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".old-{out.name}-"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_stale_temporaries(out: Path) -> None:
    """Remove temporaries that killed earlier runs left beside `out`; a live run's is left alone."""
    for candidate in out.parent.glob(f".tmp-{out.name}-*"):
        try:
            pid = int((candidate / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            pid = None
        if pid is not None and _alive(pid):
            continue
        shutil.rmtree(candidate, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def directory_weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
