"""What every command shares: the consoles, the error-to-exit-code guard, --json output. (The engine options
`serve` and `profile` share, so what profile measures is what serve runs, are generated from `EngineConfig`
by `flags.py`.)"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import typer
from rich.console import Console

from optcli.errors import KpiFailed, UsageError

out = Console()
err = Console(stderr=True)


def print_table(table) -> None:
    """A table on stdout; piped or redirected (a CI log, a file), at its natural width instead of rich's
    80-column default, so no cell is folded or cut with an ellipsis."""
    if out.is_terminal:
        out.print(table)
        return
    from rich.measure import Measurement

    natural = Measurement.get(out, out.options.update(width=1000), table).maximum
    Console(width=max(out.width, natural)).print(table)  # print(width=) is capped at the console's width


def fail(message: str, code: int, as_json: bool = False) -> None:
    """One line on stderr and exit `code`; with `as_json`, also the failure as the one JSON object on
    stdout (`{"error", "exit_code"}`), so a script reading stdout always gets an object to parse."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    if as_json:
        emit_json({"error": message, "exit_code": code})
    raise typer.Exit(code)


@contextlib.contextmanager
def guard(as_json: bool):
    """Map library errors to exit codes; in --json mode keep stdout for the one JSON object (the result,
    or the error)."""
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            yield
    except UsageError as exc:
        fail(str(exc), 2, as_json)
    except KpiFailed as exc:
        fail(str(exc), 3, as_json)
    except KeyboardInterrupt:
        fail("interrupted", 130, as_json)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for users; OPTCLI_DEBUG=1 for the traceback
        if os.environ.get("OPTCLI_DEBUG"):
            raise
        fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (set OPTCLI_DEBUG=1 for details)",
             1, as_json)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


@contextlib.contextmanager
def layer_progress(description: str, as_json: bool):
    """A per-layer progress bar for people on a terminal; nothing in pipes or --json mode."""
    if as_json or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{description} · layer {done}/{total}")

        yield advance
