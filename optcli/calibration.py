"""Calibration sets: token windows cut from text, saved with a manifest that ties them to a tokenizer.

Quantizers (GPTQ, AWQ, SmoothQuant) need a few hundred sequences of real text. A set is built
once, hashed, and saved as a `datasets` dataset plus `manifest.json`; `quantize --calibration DIR`
refuses a set whose token ids came from a different tokenizer, since those ids would mean nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from optcli import __version__
from optcli.errors import UsageError

CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "calibration_data"
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


@dataclass
class CalibrationSet:
    input_ids: list[list[int]]
    manifest: dict

    def __len__(self) -> int:
        return len(self.input_ids)


def build_calibration_set(
    tokenizer, documents: list[str], samples: int, seq_len: int, seed: int = 0, source: str = "builtin"
) -> CalibrationSet:
    """Tokenize, drop empty and duplicate documents, pack into seq_len windows, pick `samples`."""
    from optcli.models import tokenizer_fingerprint

    seen: set[str] = set()
    unique = []
    for doc in documents:
        key = doc.strip()
        if key and key not in seen:
            seen.add(key)
            unique.append(key)
    if not unique:
        raise UsageError(f"calibration source '{source}' has no non-empty documents")
    # One stream of documents, each opened with BOS as at inference, cut into full windows.
    stream: list[int] = []
    for doc in unique:
        stream.extend(tokenizer(doc, add_special_tokens=True)["input_ids"])
    windows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not windows:  # corpus shorter than one window: use it whole
        windows = [stream]
    random.Random(seed).shuffle(windows)
    chosen = windows[:samples]
    digest = hashlib.sha256(json.dumps(chosen).encode()).hexdigest()
    manifest = {
        "source": source,
        "documents_read": len(documents),
        "documents_dropped": len(documents) - len(unique),
        "samples": len(chosen),
        "samples_requested": samples,
        "seq_len": seq_len,
        "seed": seed,
        "tokens": sum(len(w) for w in chosen),
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "sha256": digest,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "optcli_version": __version__,
    }
    return CalibrationSet(chosen, manifest)


def default_calibration_set(tokenizer, samples: int, seq_len: int, seed: int = 0) -> CalibrationSet:
    return build_calibration_set(tokenizer, list(calibration_documents()), samples, seq_len, seed)


def save_calibration_set(calib: CalibrationSet, out: Path) -> Path:
    from datasets import Dataset

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-calib-"))
    try:
        Dataset.from_dict({"input_ids": calib.input_ids}).save_to_disk(str(tmp / "data"))
        (tmp / "manifest.json").write_text(json.dumps(calib.manifest, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_calibration_set(path: Path, tokenizer=None) -> CalibrationSet:
    """Load a saved set; with `tokenizer`, refuse a set made with another one."""
    from datasets import load_from_disk

    from optcli.models import tokenizer_fingerprint

    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise UsageError(f"{path}: not a calibration set (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        data = load_from_disk(str(path / "data"))
    except (ValueError, OSError, FileNotFoundError) as exc:
        raise UsageError(f"{path}: unreadable calibration set ({str(exc).splitlines()[0]})") from None
    if tokenizer is not None:
        ours = tokenizer_fingerprint(tokenizer)
        if manifest.get("tokenizer_hash") != ours:
            raise UsageError(
                f"{path}: calibration set was made with another tokenizer "
                f"({manifest.get('tokenizer') or 'unknown'}, hash {manifest.get('tokenizer_hash')}; this model's is {ours})"
            )
    return CalibrationSet([list(row) for row in data["input_ids"]], manifest)


def build_from_source(tokenizer, source: str, samples: int, seq_len: int, seed: int = 0) -> CalibrationSet:
    """`builtin` (the project's corpus) or a UTF-8 .txt file of blank-line separated documents."""
    if source == "builtin":
        return build_calibration_set(tokenizer, list(calibration_documents()), samples, seq_len, seed, source)
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"calibration source not found: {source} (a .txt file or 'builtin')")
    if path.suffix != ".txt":
        raise UsageError(f"{source}: unsupported calibration source type '{path.suffix}' (supported: .txt, builtin)")
    try:
        documents = read_documents(path)
    except UnicodeDecodeError:
        raise UsageError(f"{source}: not UTF-8 text") from None
    manifest_source = f"{path.resolve()} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]})"
    return build_calibration_set(tokenizer, documents, samples, seq_len, seed, manifest_source)
