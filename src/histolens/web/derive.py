"""Pydantic schemas derived from the dataclasses that carry results across the API.

The fields (names, types, defaults, which are required) are the dataclass's own; this module
adds only what /docs says of them. A field the dataclass marks ``api=False`` (its JSON
bookkeeping, or what the response says elsewhere) and its ``extra`` are left out.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, create_model

__all__ = ["schema_of"]


def schema_of(
    record: type,
    docs: Mapping[str, Mapping[str, Any]] | None = None,
    types: Mapping[str, Any] | None = None,
) -> type[BaseModel]:
    """A pydantic model of the dataclass ``record``, named as it, with its docstring.

    Args:
        docs: keyword arguments of ``Field`` (description, examples) by field name; one set
            of docs may serve several records (names a record lacks are not used).
        types: a field's type where the schema's differs (a nested dataclass's schema).
    """
    docs, types = docs or {}, types or {}
    hints = typing.get_type_hints(record)
    fields = {
        f.name: f
        for f in dataclasses.fields(record)
        if f.name != "extra" and f.metadata.get("api", True)
    }
    unknown = sorted(set(types) - set(fields))
    if unknown:
        raise ValueError(f"{record.__name__} has no API field {', '.join(unknown)}.")
    model: dict[str, Any] = {}
    for name, f in fields.items():
        about = dict(docs.get(name, {}))
        if f.default is not dataclasses.MISSING:
            about["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            about["default_factory"] = f.default_factory
        model[name] = (types.get(name, hints[name]), Field(**about))
    return create_model(record.__name__, __doc__=record.__doc__, **model)
