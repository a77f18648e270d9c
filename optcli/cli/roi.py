"""`optcli roi`: cost, savings, payback and capacity from a profile report or an estimate (rendering in optcli.roi.render)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optcli.cli.app import app
from optcli.cli.common import emit_json, err, guard, out
from optcli.cli.flags import with_options
from optcli.errors import UsageError
from optcli.roi.analysis import RoiOptions


@app.command()
@with_options(options=RoiOptions)
def roi(
    options: RoiOptions,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG of replicas and load over the trace.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Cost per 1K tokens, savings, payback, replicas and autoscaling from a profile report or an estimate."""
    from optcli.roi.analysis import compute_roi

    with guard(as_json):
        if plot is not None and options.load_trace is None:
            raise UsageError("--plot needs --load-trace")
        if plot is not None:
            from optcli.roi.capacity import check_plot_path

            check_plot_path(plot)  # before the table: a plot that cannot be written is exit 2 with nothing printed
        result = compute_roi(options)
        if plot is not None:
            from optcli.roi.capacity import plot as plot_replay

            plot_replay(result["capacity"]["autoscaling"]["rows"], plot)
    if as_json:
        emit_json(result)
        return
    from optcli.roi.render import render_roi, render_warnings

    render_roi(result, out, plot)
    render_warnings(result, err)
