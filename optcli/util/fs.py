"""The one atomic directory writer: build in a hidden sibling, rename into place at the end.

A run killed at any point leaves at most a `.tmp-<name>-<random>` sibling, never a half-written
target. Each temporary holds an owner file naming its writer (pid, the process's start time and the
boot id where the OS tells them), so the next write beside it can tell a dead writer's leftovers,
which it removes and logs, from a live writer's, which it leaves alone, even after a pid is reused.
Scratch directories in the system's temporary directory (`scratch_directory`) are owned the same way.

One rule decides what a write may replace (`check_out_dir`), checked before any work: `--force`
replaces only an optcli output of the same kind (recognised by the JSON file each kind holds) or an
empty directory; never an input of the run (the source model, a directory holding it or inside it),
never through a symbolic link, and nothing else: those are exit 2, naming what is there.
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
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from optcli.errors import UsageError

OWNER_FILE = ".optcli-owner-pid"  # JSON {"pid", "start", "boot_id", "host"}; older runs wrote a bare pid
STALE_AFTER_S = 60.0  # a temporary with no owner file is a writer's only if it is younger than this
_TEMPORARY = re.compile(r"\.(?P<kind>tmp|old)-(?P<name>.+)-[a-z0-9_]{8}")  # ours: .tmp-NAME-xxxxxxxx
log = logging.getLogger("optcli")


@dataclass(frozen=True)
class OutputKind:
    """A kind of directory optcli writes, told by a JSON object every one of them holds (`marker`) with
    these top-level keys: what --force may replace, and how an existing directory is named in a refusal."""

    name: str
    marker: str
    keys: tuple[str, ...]

    def made(self, path: Path) -> bool:
        try:
            data = json.loads((Path(path) / self.marker).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(key in data for key in self.keys)


# Every kind optcli writes, with the file it has always written (so outputs of earlier versions count too).
ARTIFACT = OutputKind("quantized artifact", "optcli.json", ("optcli_version", "recipe", "source"))
CALIBRATION_SET = OutputKind("calibration set", "manifest.json", ("optcli_version", "tokenizer_hash", "sha256"))
REPORT = OutputKind("profile report", "report.json", ("model", "versions"))
KINDS = (ARTIFACT, CALIBRATION_SET, REPORT)

Inputs = Mapping[str, Path | str | None]  # what the run reads, by name ("source model"): never written over


def check_out_dir(out: Path, force: bool = False, kind: OutputKind | None = None, inputs: Inputs | None = None) -> None:
    """The one rule for a directory a command creates (or, with `force`, replaces), applied before any work.

    Refused (UsageError, exit 2) with one line naming what is there: a symbolic link; one of the run's
    `inputs`, a directory holding one or inside one; a path under a file or in a place the OS will not
    write; an existing directory unless `force` and it is empty or a `kind` optcli wrote."""
    out = Path(out)
    _refuse_link(out)
    _refuse_inputs(out, inputs)
    check_writable(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"output path exists and is not a directory: {out}")
    if kind is None:  # a writer that never replaces (convert)
        raise UsageError(f"output directory already exists: {out} (choose a new path)")
    if any(out.iterdir()) and not kind.made(out):
        raise UsageError(f"output directory {out} holds {describe(out)}, not a {kind.name}: kept "
                         f"(--force replaces only a {kind.name} or an empty directory)")
    if not force:
        raise UsageError(f"output directory already exists: {out} (pass --force to replace it)")


def check_report_dir(out: Path, kind: OutputKind, files: tuple[str, ...]) -> None:
    """The same rule for a writer that replaces only `files` inside a directory, keeping the rest (the
    profile report): a new or existing directory, whose `files`, where present, must be a `kind` optcli wrote."""
    out = Path(out)
    _refuse_link(out)
    check_writable(out, into=True)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path exists and is not a directory: {out}")
    present = [name for name in files if (out / name).exists() or (out / name).is_symlink()]
    if present and not kind.made(out):
        raise UsageError(f"output directory {out} holds {', '.join(present)} not written by optcli as a {kind.name}: "
                         "kept (choose another directory)")


def check_out_file(path: Path, flag: str, kind: str, ours: Callable[[Path], bool]) -> None:
    """The same rule for a file a command writes, before any work: it replaces only a file that `ours`
    recognises as the `kind` it writes."""
    path = Path(path)
    _refuse_link(path)
    check_writable(path)
    if path.exists() and not path.is_file():
        raise UsageError(f"{flag} {path}: exists and is not a file")
    if path.is_file() and not ours(path):
        raise UsageError(f"{flag} {path}: exists and is not {kind}: kept (choose another file)")


def check_writable(path: Path, into: bool = False) -> None:
    """Exit 2 now, not after the work, when `path` cannot be written: a file where a directory of its path
    should be, or a place the OS refuses writes in. The directory that will receive the write (`path`
    itself with `into`, else its nearest existing parent) is probed by creating an entry in it, since
    permission bits do not stop root while read-only mounts and /proc do."""
    path = Path(path).absolute()
    place = path if into and path.is_dir() else path.parent
    while not place.exists():
        if place.is_symlink():
            raise UsageError(f"cannot write {path}: {place} is a broken symbolic link")
        place = place.parent
    if not place.is_dir():
        raise UsageError(f"cannot write {path}: {place} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".optcli-probe-", dir=place))
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {place} is not writable ({exc.strerror or exc})") from None


def describe(path: Path) -> str:
    """What a directory holds, for a refusal: the optcli output or model it is, else its first entries."""
    for kind in KINDS:
        if kind.made(path):
            return f"a {kind.name}"
    if (path / "config.json").is_file():
        return "a model (config.json)"
    names = sorted(entry.name for entry in path.iterdir())
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def _refuse_link(out: Path) -> None:
    # Writing through a link would replace (or fill) its target, which the user did not name.
    if out.is_symlink():
        raise UsageError(f"output path {out} is a symbolic link (to {os.readlink(out)}): kept; "
                         "give a real path (the link's target, or a new one)")


def _refuse_inputs(out: Path, inputs: Inputs | None) -> None:
    target = out.resolve()
    for name, path in (inputs or {}).items():
        if path is None or not Path(path).exists():
            continue
        source = Path(path).resolve()
        if target == source:
            where = f"is the {name}"
        elif target in source.parents:
            where = f"contains the {name} {source}"
        elif source in target.parents:
            where = f"is inside the {name} {source}"
        else:
            continue
        raise UsageError(f"output path {out} {where}: kept (write the output somewhere else)")


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False, kind: OutputKind | None = None,
                     inputs: Inputs | None = None) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes, once `check_out_dir`
    allows it. With `force` an existing `out` is swapped out only once the new one is complete; without
    it, an `out` that appeared meanwhile raises FileExistsError (callers may then fall back to writing into it)."""
    check_out_dir(Path(out), force, kind, inputs)
    out = Path(out).absolute()
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
    _claim(path)
    return path


def _claim(path: Path) -> None:
    """Mark `path` as this process's, so a later run can tell when its writer is gone."""
    (path / OWNER_FILE).write_text(json.dumps(_identity(os.getpid())))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace the file `path` with `text` in one step (a temporary in the same directory, flushed to disk,
    then renamed over it): a reader or a killed run sees the old file or the new one, never half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def scratch_directory(prefix: str) -> Iterator[Path]:
    """A private directory in the system's temporary directory for one run's spill files, removed when the
    block ends. A run killed meanwhile cannot remove it, so the next one with the same `prefix` removes
    the leftovers of writers that are gone (and logs each), as `atomic_directory` does beside `out`."""
    root = Path(tempfile.gettempdir())
    sweep_scratch(root, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        _claim(path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep_scratch(root: Path, prefix: str) -> list[Path]:
    """Remove `prefix*` directories in `root` whose writer is gone; returns what was removed. One with no
    owner file (an earlier version's) counts as gone once it is older than STALE_AFTER_S."""
    removed = []
    try:
        entries = [e for e in Path(root).iterdir() if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            continue
        reason = _stale_reason(entry, ours=True)
        if reason is not None:
            shutil.rmtree(entry, ignore_errors=True)
            log.warning("removed stale temporary %s left %s", entry, reason)
            removed.append(entry)
    return removed


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
