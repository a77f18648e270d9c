"""CLI options generated from typed declarations: each dataclass field declared with `config.option` (its
flag(s), help, limits) becomes one Typer option, and the command receives one instance per dataclass.

`EngineConfig`'s declared fields are the engine options `serve` and `profile` share, and `ProfileArgs`'s
groups are profile's own: a new option is one field where its type lives, never a second copy here."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer

from optcli.cli.common import fail
from optcli.errors import UsageError

# Typer option settings a field's declaration may carry beside its flags and help
_TYPER_KEYS = ("min", "max", "show_default", "envvar")


def declared(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` declared with a flag, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "flags" in f.metadata]


def _parameter(f: dataclasses.Field, hints: dict[str, Any]) -> inspect.Parameter:
    meta = f.metadata
    option = typer.Option(*meta["flags"], help=meta["help"], **{k: meta[k] for k in _TYPER_KEYS if k in meta})
    default = meta.get("cli_default", f.default)
    annotation = hints[f.name] if default is not None else hints[f.name] | None
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, option])


def _build(cls: type, values: dict[str, Any]) -> Any:
    """One instance from its flags' values: a flag left out whose field default differs from the flag's
    (`cli_default`, e.g. --max-model-len's None) gets the field's default."""
    fields = {f.name: f for f in declared(cls)}
    return cls(**{name: fields[name].default if value is None and "cli_default" in fields[name].metadata else value
                  for name, value in values.items()})


def with_options(**groups: type) -> Callable:
    """Decorator for a Typer command: one option per declared field of each group (a dataclass), and the
    command called with `name=<instance built from them>` for each group. A command that also declares
    `<name>_given` gets the flags' values as typed (None: left out), for what only a left-out flag means."""

    def wrap(func: Callable) -> Callable:
        signature = inspect.signature(func, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name not in groups and not name.endswith("_given")]
        wants = {name for name in groups if f"{name}_given" in signature.parameters}
        generated = {name: [_parameter(f, typing.get_type_hints(cls)) for f in declared(cls)]
                     for name, cls in groups.items()}
        names = {name: [p.name for p in params] for name, params in generated.items()}
        flat = [p for params in generated.values() for p in params]
        clash = {p.name for p in own} & {p.name for p in flat}
        if clash:
            raise TypeError(f"{func.__name__}: option name(s) declared twice: {sorted(clash)}")

        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            for group, cls in groups.items():
                values = {name: kwargs.pop(name) for name in names[group]}
                try:  # a group's own checks (EngineConfig's): exit 2 with one line, as in the command
                    kwargs[group] = _build(cls, values)
                except UsageError as exc:
                    fail(str(exc), 2, bool(kwargs.get("as_json")))
                if group in wants:
                    kwargs[f"{group}_given"] = values
            return func(*args, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == p.POSITIONAL_OR_KEYWORD and
                  p.default is not p.empty else p for p in own]
        positional = [p for p in params if p.kind != p.KEYWORD_ONLY]
        command.__signature__ = signature.replace(parameters=[*positional, *flat,
                                                              *(p for p in params if p.kind == p.KEYWORD_ONLY)])
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        del command.__wrapped__  # Typer must read the generated signature, not the function's own
        return command

    return wrap
