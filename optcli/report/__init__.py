"""Profile report writers: report.json (the contract), report.md (for PRs), report.html (standalone).

Writes are atomic so `--out` never holds a half-written or mismatched set: everything is rendered
in memory first, then a new directory is built by the one atomic directory writer (optcli.util.fs:
a temporary sibling renamed into place, stale ones from killed runs swept), or, when the directory
already exists (it may hold other artifacts), each file is replaced with temp file + os.replace; the
files replaced must be an earlier report's (util.fs's rule: only an optcli output of the same kind).

report renders a finished `ProfileReport`: it imports only schema, errors and util (and matplotlib for plots).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optcli.errors import UsageError
from optcli.report.html import render_html
from optcli.report.markdown import render_markdown
from optcli.schema.report import ProfileReport
from optcli.util.fs import REPORT, atomic_directory, atomic_write_text, check_report_dir

__all__ = ["check_out", "render_html", "render_markdown", "write_reports"]

FILES = ("report.json", "report.md", "report.html")


def _write_file(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _replace_in_place(out_dir: Path, contents: dict[str, str]) -> None:
    for name, text in contents.items():
        atomic_write_text(out_dir / name, text)


def check_out(out_dir: str | Path) -> None:
    """What `write_reports` would refuse, said before the run measures anything: a link, a path under a
    file or in an unwritable place, a directory whose report files optcli did not write."""
    check_report_dir(Path(out_dir), REPORT, FILES)


def write_reports(report: ProfileReport | Mapping[str, Any], out_dir: str | Path,
                  samples: Mapping[str, Any] | None = None, sweep: Sequence[Any] | None = None,
                  baseline_report: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write report.json / report.md / report.html into out_dir; returns {"json"|"md"|"html": path}."""
    out_dir = Path(out_dir)
    check_out(out_dir)
    report = ProfileReport.coerce(report)
    contents = {
        "report.json": report.to_json(),
        "report.md": render_markdown(report),
        "report.html": render_html(report, samples=samples, sweep=sweep, baseline_report=baseline_report),
    }
    if out_dir.is_dir():
        _replace_in_place(out_dir, contents)
    else:
        try:
            with atomic_directory(out_dir) as tmp_dir:
                for name, text in contents.items():
                    _write_file(tmp_dir / name, text)
        except (FileExistsError, UsageError):
            if not out_dir.is_dir():  # a file is in the way: that's the caller's to fix
                raise
            _replace_in_place(out_dir, contents)  # created concurrently: fall back to per-file
    return {name.split(".")[1]: out_dir / name for name in FILES}
