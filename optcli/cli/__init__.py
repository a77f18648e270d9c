"""The `optcli` command line: one module per command (its flags and its terminal rendering), thin
over the library rooms below it (bench, serve, quantize, calibration, roi).

Exit codes: 0 ok · 1 runtime failure · 2 bad input or usage · 3 a KPI gate failed. With --json,
stdout carries exactly one JSON object; progress and logs go to stderr.

cli may import every other room; nothing imports cli. Each command imports its room inside the
command function: that room pulls in torch, transformers or llm-compressor, which `optcli --help`
and `optcli roi` do not need.
"""

from __future__ import annotations

# Importing a command module registers its command; this order is the order `optcli --help` lists them.
# isort: off
from optcli.cli import quantize, profile, serve, roi, recipes, calibrate, kpi  # noqa: F401
# isort: on
import sys

import typer

from optcli.cli.app import app
from optcli.cli.common import emit_json

__all__ = ["app", "run"]

# click's ClickException, whether typer uses click or its own copy of it (typer >= 0.24): found through the
# public BadParameter, which derives from it in both.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def run() -> None:
    """The `optcli` script. Flags click rejects (a missing option, a bad value) fail before any command
    runs, so its `guard` cannot answer them: here they keep click's message and exit code, and with
    --json also print the `{"error", "exit_code"}` object every command prints when it fails."""
    try:
        code = app(standalone_mode=False)
    except CLICK_ERROR as exc:
        _show_click_error(exc)
        if "--json" in sys.argv[1:] and type(exc).__name__ != "NoArgsIsHelpError":  # that one printed the help
            emit_json({"error": exc.format_message(), "exit_code": exc.exit_code})
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _show_click_error(exc) -> None:
    """As typer shows it in its own standalone mode (a rich panel), else click's plain text."""
    try:
        from typer.rich_utils import rich_format_error
    except ImportError:  # pragma: no cover - typer without rich
        exc.show()
        return
    rich_format_error(exc)
