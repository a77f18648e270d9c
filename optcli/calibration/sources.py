"""Calibration sources → documents, with a hash of what was read and the reason for every row dropped.

A source is a file (.txt, .jsonl, .json, .parquet, .csv), a directory of such files, a
`datasets.save_to_disk` directory, `hf:NAME[:CONFIG][:SPLIT]`, `builtin` (calibration_data/) or
`self` (text sampled from the model: data-free calibration). Documents are text, or token ids
where the text never existed (`self`) or came from a chat template (already holds BOS).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from optcli.calibration.corpus import CALIBRATION_DIR, calibration_documents, calibration_files, read_documents
from optcli.checkpoints.resolve import weight_hashes
from optcli.engine import Engine, SamplingParams
from optcli.errors import UsageError

FILE_TYPES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
JSON_LIST_KEYS = ("data", "rows", "examples")  # a .json object holds its rows under one of these
DEFAULT_TEXT_FIELD = "text"


@dataclass
class Documents:
    docs: list[str | list[int]] = field(default_factory=list)
    description: str = ""
    sha256: str = ""
    read: int = 0  # rows or documents seen, usable or not
    dropped: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)


@dataclass
class RowOptions:
    tokenizer: object
    text_field: str | None = None  # None: "text", or OpenAI-style "messages" when there is no "text"
    chat_template: bool = False


def read_source(source: str, opts: RowOptions, model_path: Path | None = None,
                samples: int = 128, seq_len: int = 512, seed: int = 0) -> Documents:
    if source == "builtin":
        return builtin_documents()
    if source == "self":
        if model_path is None:
            raise UsageError("source 'self' needs the model (optcli calibrate --model)")
        return self_documents(model_path, samples, seq_len, seed)
    if source.startswith("hf:"):
        return hub_documents(source, opts)
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"calibration source not found: {source} (a file, a directory, hf:NAME, builtin or self)")
    if path.is_dir():
        if any((path / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return saved_dataset_documents(path, opts)
        return directory_documents(path, opts)
    if path.suffix.lower() not in FILE_TYPES:
        raise UsageError(f"{path}: unsupported calibration source type '{path.suffix}' "
                         f"(supported: {', '.join(FILE_TYPES)}, a directory, hf:NAME, builtin, self)")
    if path.stat().st_size == 0:
        raise UsageError(f"{path}: empty file")
    out = Documents(description=str(path.resolve()), sha256=_file_sha256(path))
    read_file(path, opts, out)
    return out


def read_file(path: Path, opts: RowOptions, out: Documents) -> None:
    suffix = path.suffix.lower()
    if suffix == ".txt":

        docs = _decode(path, read_documents)
        out.read += len(docs)
        out.docs.extend(docs)
    elif suffix == ".jsonl":
        rows: list = []
        for line in _decode(path, lambda p: p.read_text(encoding="utf-8")).splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                out.read += 1
                out.dropped["invalid JSON"] += 1
        rows_to_documents(rows, str(path), opts, out)
    elif suffix == ".json":
        rows_to_documents(_json_rows(path), str(path), opts, out)
    elif suffix == ".csv":
        def read_csv(p: Path) -> list[dict]:
            csv.field_size_limit(1 << 30)
            with p.open(encoding="utf-8-sig", newline="") as fh:
                return list(csv.DictReader(fh))

        rows_to_documents(_decode(path, read_csv), str(path), opts, out)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
        rows_to_documents(rows, str(path), opts, out)


def rows_to_documents(rows: list, label: str, opts: RowOptions, out: Documents) -> None:
    """Rows (dicts, or bare strings) → documents; a field no row has is an error naming the ones that exist."""
    fields = list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row))
    wanted = opts.text_field or DEFAULT_TEXT_FIELD
    chat = opts.chat_template or (opts.text_field is None and wanted not in fields and "messages" in fields)
    if fields and chat and "messages" not in fields:
        raise UsageError(f"{label}: no 'messages' field to render with the chat template (fields: {', '.join(fields)})")
    if fields and not chat and wanted not in fields:
        raise UsageError(f"{label}: no field '{wanted}' (fields: {', '.join(fields)}); choose one with --text-field")
    if chat and not getattr(opts.tokenizer, "chat_template", None):
        raise UsageError(f"{label}: rows hold 'messages' but the model's tokenizer has no chat template "
                         "(give a plain text field with --text-field)")
    for row in rows:
        out.read += 1
        if isinstance(row, str) and not chat:
            out.docs.append(row)
        elif not isinstance(row, dict):
            out.dropped["not an object"] += 1
        elif chat:
            ids = _render_chat(opts.tokenizer, row.get("messages"))
            if ids is None:
                out.dropped["invalid messages"] += 1
            else:
                out.docs.append(ids)
        elif row.get(wanted) is None:
            out.dropped["missing field"] += 1
        elif not isinstance(row[wanted], str):
            out.dropped["not a string"] += 1
        else:
            out.docs.append(row[wanted])


def _render_chat(tokenizer, messages) -> list[int] | None:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        return None
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects this conversation drops the row, not the run
        return None
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already wrote BOS


def _json_rows(path: Path) -> list:
    try:
        data = json.loads(_decode(path, lambda p: p.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: invalid JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in JSON_LIST_KEYS:
            if isinstance(data.get(key), list):
                return data[key]
        keys = ", ".join(data) or "none"
    else:
        keys = type(data).__name__
    raise UsageError(f"{path}: expected a list of rows, or an object with a list under "
                     f"{' / '.join(repr(k) for k in JSON_LIST_KEYS)} (found: {keys})")


def _decode(path: Path, reader):
    try:
        return reader(path)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None


def directory_documents(root: Path, opts: RowOptions) -> Documents:
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)]
    usable = [p for p in files if p.suffix.lower() in FILE_TYPES]
    if not usable:
        raise UsageError(f"{root}: no calibration files (supported: {', '.join(FILE_TYPES)})")
    out = Documents(description=f"{root.resolve()}/ ({len(usable)} files)", sha256=_files_sha256(root, usable))
    skipped = [str(p.relative_to(root)) for p in files if p not in usable]
    if skipped:
        out.warnings.append(f"skipped {len(skipped)} unsupported file(s) in {root}: {', '.join(skipped[:5])}"
                            + (" …" if len(skipped) > 5 else ""))
    for path in usable:
        if path.stat().st_size == 0:
            out.warnings.append(f"skipped empty file {path}")
            continue
        read_file(path, opts, out)
    return out


def saved_dataset_documents(path: Path, opts: RowOptions) -> Documents:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (ValueError, OSError, FileNotFoundError) as exc:
        raise UsageError(f"{path}: unreadable saved dataset ({str(exc).splitlines()[0]})") from None
    out = Documents(sha256=_files_sha256(path, [p for p in sorted(path.rglob("*")) if p.is_file()]))
    if isinstance(data, DatasetDict):
        split = "train" if "train" in data else next(iter(data))
        if len(data) > 1:
            out.warnings.append(f"{path}: using split '{split}' of {', '.join(data)}")
        data = data[split]
    out.description = f"{path.resolve()} (saved dataset, {len(data)} rows)"
    rows_to_documents(list(data), str(path), opts, out)
    return out


def hub_documents(source: str, opts: RowOptions) -> Documents:
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise UsageError(f"bad hub source '{source}' (expected hf:NAME[:CONFIG][:SPLIT])")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 and parts[2] else "train")
    import datasets

    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, not found, gated, bad split: all "cannot load" to the user
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        where = f"config {config}, split {split}" if config else f"split {split}"
        raise UsageError(f"cannot load hub dataset '{name}' ({where}): {reason}; "
                         "offline? save it with datasets.save_to_disk elsewhere and pass that directory") from None
    fingerprint = getattr(data, "_fingerprint", None) or hashlib.sha256(json.dumps(list(data)[:1000], default=str).encode()).hexdigest()
    digest = hashlib.sha256(json.dumps([name, config, split, fingerprint]).encode()).hexdigest()
    out = Documents(description=f"{source} ({len(data)} rows)", sha256=digest)
    rows_to_documents(list(data), source, opts, out)
    return out


def builtin_documents() -> Documents:

    docs = list(calibration_documents())
    return Documents(docs, "builtin (calibration_data/)", _files_sha256(CALIBRATION_DIR, calibration_files()), len(docs))


def self_documents(model_path: Path, samples: int, seq_len: int, seed: int) -> Documents:
    """Data-free calibration: `samples` sequences of seq_len tokens sampled from BOS at temperature 1."""

    engine = Engine(str(model_path), device="cpu", dtype="float32", max_num_seqs=min(samples, 32), max_model_len=seq_len)
    start = engine.tokenizer.bos_token_id
    if start is None:
        raise UsageError(f"{model_path}: the tokenizer has no BOS token to start sampling from (source 'self')")
    params = [SamplingParams(max_tokens=seq_len - 1, temperature=1.0, seed=seed * 1_000_003 + i, ignore_eos=True)
              for i in range(samples)]
    outputs = engine.generate([[start]] * samples, params)
    docs: list[str | list[int]] = [[start, *o.token_ids] for o in outputs]
    recipe = {"weights": weight_hashes(Path(model_path)), "temperature": 1.0, "start": start,
              "samples": samples, "seq_len": seq_len, "seed": seed}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return Documents(docs, f"self (sampled from the model: {samples} × {seq_len} tokens, temperature 1.0)",
                     digest, len(docs))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files_sha256(root: Path, files: list[Path]) -> str:
    listing = [(str(p.relative_to(root)), _file_sha256(p)) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
