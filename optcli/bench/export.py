"""`profile --export FILE`: one row per online request (its timings and token counts) as JSONL or CSV,
for analysis outside the report: which requests were slow, how latency grew with prompt length."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from optcli.errors import UsageError
from optcli.util.fs import check_out_file

FORMATS = (".jsonl", ".csv")
FIELDS = ("model", "phase", "level", "measured", "index", "start_s", "ttft_ms", "tpot_ms", "itl_ms_mean", "e2e_ms", "prompt_tokens",
          "output_tokens", "error")


def check_export_path(path: Path | None) -> None:
    """Before any measuring: the format, and a place we may write (an existing file only an earlier export)."""
    if path is None:
        return
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"--export must end in .jsonl or .csv (got {path.name})")
    check_out_file(path, "--export", "an earlier export", is_export)


def is_export(path: Path) -> bool:
    """Whether `path` is what `write_export` writes (an empty file, a CSV with our header, JSONL rows with
    our fields): the only file --export replaces, so `--export prompts.jsonl` cannot eat the dataset."""
    try:
        if path.stat().st_size == 0:
            return True
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().strip()
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix.lower() == ".csv":
        return first == ",".join(FIELDS)
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and set(row) == set(FIELDS)


def level_rows(online: dict, model: str, phase: str, level) -> list[dict]:
    """One load level's requests (an `online_load` summary), `measured` false for warm-up and cool-down."""
    lo, hi = online["measured"]
    return request_rows(online["timings"], model, phase, level.label, range(lo, hi))


def request_rows(timings, model: str, phase: str, level: str | None = None, measured: range | None = None) -> list[dict]:
    """The run's requests in send order, times relative to its first send (s) and in ms; null where a
    figure does not exist (a failed request's latencies, TPOT of a one-token output)."""
    t0 = min((t.start for t in timings), default=0.0)
    rows = []
    for i, t in enumerate(timings):
        ok = t.ok
        gaps = [b[0] - a[0] for a, b in zip(t.token_times, t.token_times[1:], strict=False)] if ok else []
        tpot = t.tpot if ok else None
        rows.append({"model": model, "phase": phase, "level": level, "measured": measured is None or i in measured,
                     "index": i, "start_s": round(t.start - t0, 6),
                     "ttft_ms": t.ttft * 1e3 if ok else None, "tpot_ms": None if tpot is None else tpot * 1e3,
                     "itl_ms_mean": sum(gaps) / len(gaps) * 1e3 if gaps else None,
                     "e2e_ms": t.e2e * 1e3 if ok else None, "prompt_tokens": t.prompt_tokens,
                     "output_tokens": t.output_tokens, "error": t.error})
    return rows


def write_export(path: Path, rows: list[dict]) -> None:
    """Written whole or not at all (a temporary sibling, then a rename)."""
    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS} for r in rows)
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
