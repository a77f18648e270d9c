"""Calibration sets: token windows cut from documents, saved with a manifest that ties them to a tokenizer.

Quantizers (GPTQ, AWQ, SmoothQuant) need a few hundred sequences of real text. A set is built
once (sources in sources.py, the built-in corpus in corpus.py), hashed over everything that decides its content, and
saved as a `datasets` dataset plus `manifest.json`; `quantize --calibration DIR` refuses a set whose
token ids came from a different tokenizer, since those ids would mean nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from optcli import __version__
from optcli.calibration.outliers import activation_stats
from optcli.calibration.sources import Documents, RowOptions, read_source
from optcli.checkpoints.resolve import load_model, resolve_model, tokenizer_fingerprint, weight_hashes
from optcli.errors import UsageError
from optcli.util.fs import CALIBRATION_SET, atomic_directory, check_out_dir

STRATA = 4  # document-length quantile buckets that selection draws from in turn


@dataclass
class CalibrationSet:
    input_ids: list[list[int]]
    manifest: dict

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_documents(tokenizer, docs: Documents) -> list[list[int]]:
    """Drop empty and duplicate documents (counted in `docs.dropped`); text gets BOS as at inference."""
    seen: set = set()
    unique: list[str | tuple[int, ...]] = []
    for doc in docs.docs:
        key = doc.strip() if isinstance(doc, str) else tuple(doc)
        if not key:
            docs.dropped["empty"] += 1
        elif key in seen:
            docs.dropped["duplicate"] += 1
        else:
            seen.add(key)
            unique.append(key)
    texts = [k for k in unique if isinstance(k, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"] if texts else [])
    return [list(next(encoded)) if isinstance(k, str) else list(k) for k in unique]


def select_windows(docs: list[list[int]], samples: int, seq_len: int, seed: int) -> tuple[list[list[int]], int]:
    """Stratified by document length: quantile buckets of documents, each packed (short documents) or
    split (long ones) into seq_len windows, then drawn round-robin so short and long both appear.
    Returns the chosen windows and how many were available."""
    rng = random.Random(seed)
    order = sorted(range(len(docs)), key=lambda i: (len(docs[i]), i))
    strata = max(1, min(STRATA, len(docs)))
    pools: list[list[list[int]]] = []
    leftover: list[int] = []
    for b in range(strata):
        bucket = order[b * len(order) // strata : (b + 1) * len(order) // strata]
        rng.shuffle(bucket)
        stream = [t for i in bucket for t in docs[i]]
        full = len(stream) // seq_len * seq_len
        pools.append([stream[i : i + seq_len] for i in range(0, full, seq_len)])
        leftover.extend(stream[full:])  # each bucket's tail: packed together below
    full = len(leftover) // seq_len * seq_len
    pools.append([leftover[i : i + seq_len] for i in range(0, full, seq_len)])
    available = sum(len(p) for p in pools)
    if available == 0:  # the whole corpus is shorter than one window: use it whole
        return [[t for d in docs for t in d]], 1
    for pool in pools:
        rng.shuffle(pool)
    chosen: list[list[int]] = []
    while len(chosen) < samples and any(pools):
        for pool in pools:
            if pool and len(chosen) < samples:
                chosen.append(pool.pop())
    return chosen, available


def token_stats(lengths: list[int]) -> dict:
    """Document token lengths: summary and a power-of-two histogram ([1,1], [2,3], [4,7], ...)."""
    ordered = sorted(lengths)
    bins, lo = [], 1
    while lo <= ordered[-1]:
        hi = lo * 2 - 1
        bins.append({"min": lo, "max": hi, "count": sum(lo <= n <= hi for n in ordered)})
        lo *= 2
    return {
        "documents": len(ordered), "total": sum(ordered), "min": ordered[0], "max": ordered[-1],
        "mean": round(statistics.fmean(ordered), 2), "median": statistics.median(ordered), "histogram": bins,
    }


def build_set(tokenizer, docs: Documents, samples: int, seq_len: int, seed: int = 0, strict: bool = False,
              extra: dict | None = None) -> CalibrationSet:
    """Tokenize, drop empty and duplicate documents, pick `samples` windows of seq_len tokens; hash the result."""

    ids = tokenize_documents(tokenizer, docs)
    if not ids:
        why = ", ".join(f"{n} {r}" for r, n in sorted(docs.dropped.items())) or "nothing read"
        raise UsageError(f"{docs.description}: no usable text ({docs.read} documents read; dropped: {why})")
    chosen, available = select_windows(ids, samples, seq_len, seed)
    if len(chosen) < samples:
        short = (f"{docs.description}: only {available} window(s) of up to {seq_len} tokens in {len(ids)} documents, "
                 f"fewer than --samples {samples}")
        if strict:
            raise UsageError(f"{short} (--strict)")
        docs.warnings.append(f"{short}; using {len(chosen)}")
    tok_hash = tokenizer_fingerprint(tokenizer)
    content = {"input_ids": chosen, "source_sha256": docs.sha256, "tokenizer_hash": tok_hash,
               "samples": samples, "seq_len": seq_len, "seed": seed}
    manifest = {
        "source": docs.description,
        "source_sha256": docs.sha256,
        **(extra or {}),
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "tokenizer_hash": tok_hash,
        "samples": len(chosen),
        "samples_requested": samples,
        "windows_available": available,
        "seq_len": seq_len,
        "seed": seed,
        "tokens": sum(len(w) for w in chosen),
        "documents_read": docs.read,
        "documents_used": len(ids),
        "documents_dropped": dict(sorted(docs.dropped.items())),
        "token_stats": token_stats([len(d) for d in ids]),
        "warnings": list(docs.warnings),
        "sha256": hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "optcli_version": __version__,
    }
    return CalibrationSet(chosen, manifest)


def default_calibration_set(tokenizer, samples: int, seq_len: int, seed: int = 0) -> CalibrationSet:
    """What `quantize` uses without --calibration: the builtin corpus, through the same code as calibrate."""
    return build_from_source(tokenizer, "builtin", samples, seq_len, seed)


def build_from_source(tokenizer, source: str, samples: int, seq_len: int, seed: int = 0, *, text_field: str | None = None,
                      chat_template: bool = False, model_path: Path | None = None, strict: bool = False) -> CalibrationSet:
    """Any source `read_source` knows (a file, a directory, hf:NAME, builtin, self) → a calibration set."""
    docs = read_source(source, RowOptions(tokenizer, text_field, chat_template), model_path, samples, seq_len, seed)
    extra = {"source_spec": source, "text_field": text_field, "chat_template": chat_template}
    return build_set(tokenizer, docs, samples, seq_len, seed, strict, extra)


def save_calibration_set(calib: CalibrationSet, out: Path, stats: dict | None = None, force: bool = False,
                         sensitivity: dict | None = None) -> Path:
    """Atomically: token ids as a `datasets` dataset in data/, manifest.json, and stats.json and
    sensitivity.json + sensitivity.png when given."""
    from datasets import Dataset


    with atomic_directory(Path(out), force, CALIBRATION_SET) as tmp:
        Dataset.from_dict({"input_ids": calib.input_ids}).save_to_disk(str(tmp / "data"))
        (tmp / "manifest.json").write_text(json.dumps(calib.manifest, indent=2))
        if stats is not None:
            (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        if sensitivity is not None:
            from optcli.calibration.sensitivity_plot import plot_sensitivity

            (tmp / "sensitivity.json").write_text(json.dumps(sensitivity, indent=2))
            plot_sensitivity(sensitivity, tmp / "sensitivity.png", sensitivity.get("model", ""))
    return Path(out)


def load_calibration_set(path: Path, tokenizer=None) -> CalibrationSet:
    """Load a saved set; with `tokenizer`, refuse a set made with another one."""
    from datasets import load_from_disk


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


def calibrate(model_spec: str, source: str, out: Path, samples: int = 128, seq_len: int = 512, seed: int = 0, *,
              text_field: str | None = None, chat_template: bool = False, strict: bool = False, stats: bool = False,
              force: bool = False, batch_size: int = 8, sensitivity: bool = False) -> tuple[CalibrationSet, dict | None]:
    """`optcli calibrate`: every check before any work, then build, optionally measure outliers (`stats`) and
    per-layer sensitivity (`sensitivity`: DIR/sensitivity.json and .png), save atomically."""
    from transformers import AutoConfig, AutoTokenizer


    model = resolve_model(model_spec)  # headers only: the model loads (for --stats) after every check
    local = None if source in ("builtin", "self") or source.startswith("hf:") else Path(source).expanduser()
    check_out_dir(Path(out), force, CALIBRATION_SET, {"model": model.path, "calibration source": local})
    context = getattr(AutoConfig.from_pretrained(model.path), "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise UsageError(f"--seq-len {seq_len} is above the model's context ({context} tokens, max_position_embeddings)")
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    calib = build_from_source(tokenizer, source, samples, seq_len, seed, text_field=text_field,
                              chat_template=chat_template, model_path=model.path, strict=strict)
    report = sens = None
    loaded = load_model(model)[0] if stats or sensitivity else None
    if stats:
        report = activation_stats(loaded, calib.input_ids, batch_size)
        report["calibration_sha256"] = calib.manifest["sha256"]
    if sensitivity:  # weights hashed so `quantize --recipe auto:BITS --calibration DIR` can reuse it
        from optcli.calibration.sensitivity import measure_sensitivity

        sens = {"model": model.spec, "source_weights": weight_hashes(model.path),
                "calibration_sha256": calib.manifest["sha256"],
                **measure_sensitivity(loaded, calib.input_ids, batch_size=batch_size)}
    save_calibration_set(calib, Path(out), report, force, sens)
    return calib, report
