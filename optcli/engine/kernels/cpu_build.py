"""The one builder of our C kernel libraries (`cpu_lowbit`'s AVX2 kernels; `cpu_amx`'s AMX, AMX-FP8 and
AVX-512 VNNI kernels): compile the sources with the system's C compiler (`$CC`, else `cc`) on first use into
`$OPTCLI_CACHE/cpu-kernels/<name>-<key>.so`, load it through ctypes and declare each function's signature.

The key hashes the sources, the header, the flags and the compiler's `--version`, so an edited kernel, other
flags or another compiler build a new library and never load a stale one. The library is written to a
temporary name and renamed into place: a concurrent process sees the whole library or none.

Every failure (no compiler, a compile error, a library that does not load) is None plus one log line: the
caller's layers then keep their other paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from optcli.config import cache_dir

log = logging.getLogger(__name__)

P, I64 = ctypes.c_void_p, ctypes.c_int64


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


@dataclass(frozen=True)
class CLibrary:
    """One shared library: its sources (plus the header they share), compile flags and exported functions,
    each `name: (argtypes, restype)`; restype None for a void function."""

    name: str  # the cache file's prefix, and what a log line calls it
    sources: tuple[Path, ...]
    header: Path
    flags: tuple[str, ...]
    functions: dict[str, tuple[list, object]] = field(default_factory=dict)

    def source_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in (*self.sources, self.header))

    def source_key(self) -> str:
        """A short hash of the C source alone (names tuned choices made with this build of the kernels)."""
        return hashlib.sha256(self.source_bytes()).hexdigest()[:8]

    def build(self, what: str) -> ctypes.CDLL | None:
        """The compiled, loaded library, or None (logged) where it cannot be built here; `what` names it in
        the log line ("the AVX2 low-bit CPU kernels")."""
        cc = compiler()
        if cc is None:
            log.info("no C compiler: %s are not built", what)
            return None
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
            key = hashlib.sha256(self.source_bytes() + " ".join(self.flags).encode() + version.encode())
            out = cache_dir() / "cpu-kernels" / f"{self.name}-{key.hexdigest()[:16]}.so"
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(f".{os.getpid()}.tmp")
                subprocess.run([cc, *self.flags, *map(str, self.sources), "-o", str(tmp)], check=True,
                               capture_output=True, text=True, timeout=300)
                tmp.replace(out)  # atomic: a concurrent process sees the whole library or none
            lib = ctypes.CDLL(str(out))
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("%s did not build (%s); other CPU paths are used", what, getattr(e, "stderr", "") or e)
            return None
        for fname, (argtypes, restype) in self.functions.items():
            fn = getattr(lib, fname)
            fn.argtypes = argtypes
            fn.restype = restype
        return lib
