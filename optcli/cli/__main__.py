"""`python -m optcli.cli`: the same as the `optcli` script."""

from optcli.cli import run

run()
