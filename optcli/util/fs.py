"""The one atomic directory writer: build in a hidden sibling, rename into place at the end.

A run killed at any point leaves at most a `.tmp-<name>-<random>` sibling, never a half-written
target. Each temporary holds an owner file naming its writer (pid, the process's start time and the
boot id where the OS tells them), so the next write beside it can tell a dead writer's leftovers,
which it removes and logs, from a live writer's, which it leaves alone, even after a pid is reused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from optcli.errors import UsageError

OWNER_FILE = ".optcli-owner-pid"  # JSON {"pid", "start", "boot_id", "host"}; older runs wrote a bare pid
STALE_AFTER_S = 60.0  # a temporary with no owner file is a writer's only if it is younger than this
_TEMPORARY = re.compile(r"\.(?P<kind>tmp|old)-(?P<name>.+)-[a-z0-9_]{8}")  # ours: .tmp-NAME-xxxxxxxx
log = logging.getLogger("optcli")


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing target unless `force` (and anything that is not a directory) before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path exists and is not a directory: {out}")
    if out.exists() and not force:
        raise UsageError(f"output directory already exists: {out} (pass --force to replace it)")


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes. With `force` an
    existing `out` is swapped out only once the new one is complete; without it, an `out` that
    appeared meanwhile raises FileExistsError (callers may then fall back to writing into it)."""
    out = Path(out).absolute()
    check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(out)
    tmp = _make_temporary(out, "tmp")
    try:
        yield tmp
        (tmp / OWNER_FILE).unlink()
        os.chmod(tmp, 0o777 & ~_umask())  # private while building; the result gets the usual mode
        _install(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: Path, out: Path, force: bool) -> None:
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if not out.exists():
                raise
    if not force:
        raise FileExistsError(errno.EEXIST, "appeared while it was being written", str(out))
    old = _make_temporary(out, "old")
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _make_temporary(out: Path, kind: str) -> Path:
    """A new private `.{kind}-NAME-xxxxxxxx` sibling of `out` with this process's owner file in it."""
    while True:
        path = out.parent / f".{kind}-{out.name}-{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    (path / OWNER_FILE).write_text(json.dumps(_identity(os.getpid())))
    return path


def sweep_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporaries dead writers left beside `out`, logging each; returns what was removed.

    Only names of our pattern are considered. Another target's temporary is removed only when its
    owner file shows a dead writer; one for `out` itself also when it has no owner file and is
    older than STALE_AFTER_S. A `.old-*` (a --force swap cut short) is kept while it holds the only
    copy of its target."""
    out = Path(out).absolute()
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        found = _TEMPORARY.fullmatch(entry.name)
        if found is None or entry.is_symlink() or not entry.is_dir():
            continue
        reason = _stale_reason(entry, found["name"] == out.name)
        if reason is None:
            continue
        if found["kind"] == "old" and not (entry.parent / found["name"]).exists():
            log.warning("kept %s left %s: it holds the only copy of %s (move %s/%s back to restore it)",
                        entry.name, reason, found["name"], entry, found["name"])
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.warning("removed stale temporary %s left %s", entry.name, reason)
        removed.append(entry)
    return removed


def _stale_reason(entry: Path, ours: bool) -> str | None:
    """How the writer of `entry` is known to be gone ("by pid 12 (no longer running)"), or None."""
    owner = _read_owner(entry)
    if owner is None:
        try:
            age = time.time() - entry.stat().st_mtime
        except OSError:
            return None
        return f"with no owner file, {age:.0f} s old" if ours and age > STALE_AFTER_S else None
    why = writer_gone(owner)
    return f"by pid {owner['pid']} ({why})" if why else None


def _read_owner(entry: Path) -> dict | None:
    try:
        data = json.loads((entry / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    owner = {"pid": data} if isinstance(data, int) else data  # a bare pid: written by earlier versions
    ok = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and not isinstance(owner["pid"], bool)
    return owner if ok else None


def writer_gone(owner: dict) -> str | None:
    """Why the process an owner record names can no longer be writing, or None if it may be.
    A record from another host cannot be checked here, so it counts as alive."""
    if owner.get("host") not in (None, socket.gethostname()):
        return None
    now = _identity(owner["pid"])
    if owner.get("boot_id") and now["boot_id"] and owner["boot_id"] != now["boot_id"]:
        return "written before the last reboot"
    if not _running(owner["pid"]):
        return "no longer running"
    if owner.get("start") and now["start"] and owner["start"] != now["start"]:
        return "no longer running; its pid now belongs to another process"
    return None


def _identity(pid: int) -> dict:
    """What tells this process from a later one that reuses its pid: start time (clock ticks after
    boot, from /proc) and boot id; None where the OS does not say."""
    return {"pid": pid, "start": _proc_stat(pid, 19), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "host": socket.gethostname()}


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    return _proc_stat(pid, 0) != "Z"  # a killed child its parent has not reaped yet is not writing


def _proc_stat(pid: int, field: int) -> str | None:
    """Field `field` of /proc/PID/stat counted after the command name (0 = state, 19 = starttime)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[field] if len(fields) > field else None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except (OSError, ValueError):
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
