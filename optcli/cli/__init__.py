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
from optcli.cli import quantize, profile, serve, roi, recipes, calibrate  # noqa: F401
# isort: on
from optcli.cli.app import app

__all__ = ["app", "run"]


def run() -> None:
    app()
