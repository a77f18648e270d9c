"""The one place `compare` reads a profile report. Everything else in optcli/compare asks a
`ProfileView` for named figures of a `ProfileReport` (or its JSON, read back from disk). A figure the report does not have is None, never a default number."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ACCURACY_FIELDS = ("ppl", "baseline_ppl", "ppl_ratio", "kld_mean", "kld_p99", "top1_agreement")


def _plain(value: Any) -> Any:
    """A typed report section as the plain JSON value report.json has (for compare's own report)."""
    return value.to_dict() if hasattr(value, "to_dict") else value


def _at(node: Any, path: str) -> Any:
    for key in path.split("."):
        if node is None:
            return None
        node = node.get(key) if isinstance(node, Mapping) else getattr(node, key, None)
    return node


class ProfileView:
    """Read-only named access to one `profile` report (the artifact measured against its source)."""

    def __init__(self, report: Any) -> None:
        self.report = report

    def raw(self) -> Any:
        return self.report

    def comparison_row(self, field: str) -> dict | None:
        """The artifact/source row of one figure (`comparison.rows`): ratio, ci_low, ci_high, verdict."""
        for row in _at(self.report, "comparison.rows") or []:
            if _at(row, "field") == field:
                return dict(row) if isinstance(row, Mapping) else row.model_dump()
        return None

    def ratio(self, field: str) -> dict:
        """{ratio, ci_low, ci_high, verdict, repeats} of artifact/source for one figure; all None when unmeasured."""
        row = self.comparison_row(field) or {}
        return {k: row.get(k) for k in ("ratio", "ci_low", "ci_high", "verdict", "repeats")}

    def accuracy(self) -> dict:
        acc = _at(self.report, "accuracy") or {}
        return {k: _plain(_at(acc, k)) for k in ACCURACY_FIELDS} | {"tasks": _plain(_at(acc, "tasks"))}

    def figure(self, path: str) -> Any:
        return _plain(_at(self.report, path))

    def baseline_figure(self, path: str) -> Any:
        """The source's figure as measured in the same run (`comparison.baseline`)."""
        return _at(self.report, f"comparison.baseline.{path}")

    def kpi(self) -> dict:
        kpi = _at(self.report, "kpi") or {}
        checks = [dict(c) if isinstance(c, Mapping) else c.model_dump() for c in _at(kpi, "checks") or []]
        return {"passed": bool(_at(kpi, "passed")), "checks": checks}

    def contention_warning(self) -> str | None:
        return _at(self.report, "hardware.contention.warning")

    def hardware(self) -> Any:
        return _plain(_at(self.report, "hardware"))

    def versions(self) -> Any:
        return _plain(_at(self.report, "versions"))
