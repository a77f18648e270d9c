"""Errors the CLI maps to exit codes: bad input is the user's to fix (exit 2), not a crash."""


class UsageError(Exception):
    """Bad input or usage: the CLI prints the message as one line and exits 2."""


class KpiFailed(Exception):
    """A KPI gate failed: exit 3. Carries the report, which was written before raising."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report
