"""`optcli recipes list|show` and `optcli convert llama2c`: the small read-only and conversion commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from optcli.cli.app import convert_app, recipes_app
from optcli.cli.common import emit_json, guard, out


@recipes_app.command("list")
def recipes_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the built-in recipes."""
    from optcli.quantize.recipes import list_recipes

    with guard(as_json):
        recipes = list_recipes()
    if as_json:
        emit_json({"recipes": [{"name": r.name, "backend": r.backend, "scheme": r.scheme, "description": r.description} for r in recipes]})
        return
    table = Table(title="optcli recipes")
    for col in ("name", "backend", "scheme", "calibration", "description"):
        table.add_column(col, overflow="fold")
    for r in recipes:
        calib = f"{r.calibration.samples}×{r.calibration.seq_len}" if r.needs_calibration() else "none"
        table.add_row(r.name, r.backend, r.scheme, calib, r.description)
    out.print(table)


@recipes_app.command("show")
def recipes_show(
    name: Annotated[str, typer.Argument(help="Recipe name or YAML path.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one recipe, validated."""
    import yaml

    from optcli.quantize.recipes import load_recipe

    with guard(as_json):
        recipe = load_recipe(name)
    data = recipe.model_dump()
    if as_json:
        emit_json(data)
    else:
        out.print(yaml.safe_dump(data, sort_keys=False), highlight=False)


@convert_app.command("llama2c")
def convert_llama2c_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="llama2.c checkpoint (.bin, format v0).")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="llama2.c tokenizer (.bin).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="HF directory to create.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Convert a llama2.c checkpoint and tokenizer into a Hugging Face directory."""
    from optcli.checkpoints.llama2c import convert_llama2c

    with guard(as_json):
        path = convert_llama2c(checkpoint, tokenizer, out_dir)
    if as_json:
        emit_json({"out": str(path)})
    else:
        out.print(f"wrote {path}")
