"""`Section`: the base of report.json's typed sections (`report.py`): declared fields typed and checked,
any other field kept, in the order the file had it, so a report loads and saves back to the same text."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_serializer, model_validator

# int or float, whichever the file has: a weights_bytes stays an int and a rate a float on a round trip
Num = int | float


class Section(BaseModel):
    """A report section: its declared fields typed, any other field kept as it is, key order preserved."""

    model_config = ConfigDict(extra="allow", strict=True, validate_assignment=True)
    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler):
        section = handler(data)
        if isinstance(data, dict):
            section._order = tuple(data)
        return section

    @model_serializer(mode="wrap")
    def _in_order(self, handler) -> dict[str, Any]:
        # the keys as the file had them (then any set since), so load -> save gives back the same text
        dumped = handler(self)
        keys = [k for k in self._order if k in dumped] + [k for k in dumped if k not in self._order]
        return {k: dumped[k] for k in keys}

    def get(self, key: str, default: Any = None) -> Any:
        """A field by its report.json name (declared or extra): for the few readers that take a field's name
        from data (comparison rows name theirs as "throughput.output_tok_s")."""
        known = key in type(self).model_fields or key in (self.model_extra or {})
        return getattr(self, key, default) if known else default

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python", exclude_unset=True)

    def update(self, values: dict[str, Any] | None = None, **more: Any) -> None:
        """Set several fields at once (declared ones validated, others kept as extras), like dict.update."""
        for key, value in {**(values or {}), **more}.items():
            setattr(self, key, value)

    def at(self, path: str) -> Any:
        """The value at a dotted report.json path ("latency_ms.ttft.p50"), None where any step is missing:
        comparison rows and KPI gates name their figure this way."""
        node: Any = self
        for key in path.split("."):
            node = node.get(key) if isinstance(node, Section | dict) else None
        return node


def first_error(exc: ValidationError) -> str:
    """The first bad field as report.json names it: pydantic tags a union's members onto the location
    (`total_tok_s.int`), which is not a path in the file, so they are dropped and a number is asked for."""
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"]]
    tags = [p for p in loc if p in _UNION_TAGS]
    where = ".".join(p for p in loc if p not in _UNION_TAGS) or "<root>"
    msg = "expected a number" if {"int", "float"} & set(tags) else first["msg"]
    return f"field '{where}': {msg} (got {first.get('input')!r})"


_UNION_TAGS = {"int", "float", "str", "bool", "list[int]", "list[str]", "dict[str,any]", "dict[str,int]"}
