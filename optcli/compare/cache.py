"""The artifact cache of `optcli compare`: one quantized artifact per (source weights, recipe, calibration
set, optcli version), so a second comparison of the same model re-measures without re-quantizing.

It lives in `<cache dir>/compare` (`optcli.config.cache_dir`: $OPTCLI_CACHE, else ~/.cache/optcli), or
where `--cache-dir` says; each entry is an ordinary artifact directory named `<recipe>-<key>`, which
`optcli profile` or `serve` can use as it is. `clear` removes only directories that are optcli artifacts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from optcli import __version__
from optcli.checkpoints.resolve import ModelSource, weight_hashes
from optcli.config import cache_dir
from optcli.errors import UsageError
from optcli.quantize.recipes import load_recipe
from optcli.util.fs import ARTIFACT

KEY_CHARS = 16  # of the sha256: collisions among one user's artifacts are not a concern at 64 bits


def default_cache_dir() -> Path:
    return cache_dir() / "compare"


@dataclass(frozen=True)
class CacheEntry:
    recipe: str
    key: str
    path: Path
    hit: bool  # the artifact was already there before this run


def calibration_identity(calibration: Path | None, seed: int) -> dict:
    """What decides the calibration tokens: a set's own manifest hash, else the default set and its seed."""
    if calibration is None:
        return {"default": True, "seed": seed}
    manifest = Path(calibration) / "manifest.json"
    try:
        return {"sha256": json.loads(manifest.read_text(encoding="utf-8")).get("sha256")}
    except (OSError, ValueError):
        return {"path": str(Path(calibration).absolute())}


def artifact_key(source: ModelSource, recipe: str, calibration: Path | None, seed: int) -> str:
    """sha256 over the source's weight files, the recipe's full content (a YAML recipe edited in place gets
    a new key), the calibration set and optcli's version."""
    identity = {
        "weights": weight_hashes(source.path),
        "recipe": load_recipe(recipe).model_dump(mode="json", exclude={"source"}),  # content, not where it lies
        "calibration": calibration_identity(calibration, seed),
        "optcli_version": __version__,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:KEY_CHARS]


def entry_name(recipe: str, key: str) -> str:
    stem = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe
    return f"{stem}-{key}"


def lookup(root: Path, source: ModelSource, recipe: str, calibration: Path | None, seed: int) -> CacheEntry:
    key = artifact_key(source, recipe, calibration, seed)
    path = Path(root) / entry_name(recipe, key)
    return CacheEntry(recipe, key, path, ARTIFACT.made(path))


def entries(root: Path) -> list[Path]:
    """The cached artifacts (directories optcli wrote as artifacts), by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and ARTIFACT.made(p))


def clear(root: Path) -> list[Path]:
    """Remove every cached artifact under `root`; anything else there is left alone. Returns what went."""
    removed = entries(root)
    for path in removed:
        shutil.rmtree(path)
    return removed


def ensure(root: Path, source: ModelSource, model: str, recipe: str, calibration: Path | None, seed: int,
           device: str, step) -> tuple[CacheEntry, float | None]:
    """The cached artifact for `recipe`, quantized into the cache first when missing; returns the entry and
    the seconds quantizing took (None when it was reused). Another run that fills the same entry meanwhile
    (two CI jobs sharing a cache) is not an error: its artifact is the same one, and is used."""
    from optcli.quantize.pipeline import quantize  # llm-compressor and friends: only when quantizing

    entry = lookup(root, source, recipe, calibration, seed)
    if entry.hit:
        step(f"{recipe}: cached artifact {entry.path}")
        return entry, None
    step(f"quantizing {model} with {recipe} into the cache ({entry.path})")
    started = time.perf_counter()
    try:
        quantize(model, recipe, entry.path, calibration, "cpu" if device == "cpu" else "auto", seed=seed)
    except (FileExistsError, UsageError):
        if not ARTIFACT.made(entry.path):
            raise
        step(f"{recipe}: another run cached it meanwhile; using {entry.path}")
        return replace(entry, hit=True), None
    return entry, round(time.perf_counter() - started, 1)
