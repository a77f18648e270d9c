"""The Typer application: the `optcli` group, its global options (--version, --verbose) and the
`recipes` / `convert` sub-groups. Commands register themselves on these from their own modules."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from optcli import __version__
from optcli.cli.common import out

app = typer.Typer(
    help="Quantize, profile, serve and cost LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipes_app = typer.Typer(help="List and show quantization recipes.", no_args_is_help=True)
convert_app = typer.Typer(help="Convert foreign checkpoints to Hugging Face directories.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(convert_app, name="convert")


def _version(value: bool) -> None:
    if value:
        out.print(f"optcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the libraries' own logs and progress bars.")] = False,
) -> None:
    """optcli: make LLMs cheaper and faster to serve."""
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Silence the libraries' log lines and tqdm bars: we show our own progress (stderr, terminals only)."""
    import warnings

    for key, value in {
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "LLM_COMPRESSOR_LOG_LEVEL": "ERROR",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    for name in ("torch.fx", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Some libraries pass disable=False explicitly, which TQDM_DISABLE cannot override.
    import tqdm

    original_init = tqdm.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original_init(self, *args, **kwargs)

    tqdm.tqdm.__init__ = quiet_init
