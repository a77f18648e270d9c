"""Where `compare` writes: DIR/report.json, .md, .html, pareto.png (the methods table), each artifact's full
profile report under DIR/profiles/<recipe>, and DIR/best, the chosen artifact. The same rule as every
optcli writer: checked before any work, nothing half-written, nothing of the user's replaced."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optcli.compare.render import method_cells, pareto_png, render_html, render_markdown
from optcli.report import write_files
from optcli.util.fs import ARTIFACT, OutputKind, atomic_directory, check_out_dir, check_report_dir

COMPARE_REPORT = OutputKind("compare report", "report.json", ("model", "rows", "versions"))
FILES = ("report.json", "report.md", "report.html", "pareto.png")


def check_compare_out(out: Path) -> None:
    """Exit 2 now when DIR's report files or DIR/best are not ours to replace."""
    check_report_dir(out, COMPARE_REPORT, FILES)
    best = out / "best"
    if best.exists() or best.is_symlink():
        check_out_dir(best, force=True, kind=ARTIFACT)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system allows (no second copy of the weights; it outlives a cleared
    cache), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish_best(artifact: Path, out: Path) -> Path:
    """DIR/best: the chosen artifact's files, built beside it and renamed into place (replacing an earlier
    DIR/best artifact only)."""
    best = out / "best"
    with atomic_directory(best, force=True, kind=ARTIFACT) as tmp:
        for entry in Path(artifact).iterdir():
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(entry), str(tmp / entry.name))
    return best


def write_compare_reports(report: Mapping[str, Any], out: Path, cells=None, png: bytes | None = None) -> None:
    cells = cells or method_cells(report)
    png = png if png is not None else pareto_png(report) if report.get("kind") != "optimizations" else None
    contents: dict[str, str | bytes] = {
        "report.json": json.dumps(report, indent=2, default=str) + "\n",
        "report.md": render_markdown(report, cells),
        "report.html": render_html(report, cells, png),
    }
    if png is not None:
        contents["pareto.png"] = png
    write_files(Path(out), contents)
