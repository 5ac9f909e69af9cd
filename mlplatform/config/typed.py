"""Pydantic models derived from the config schemas, for settings that cross into Serve.

A deployment's arguments are JSON (they travel through `serve deploy`), so they are validated
again where they land. Deriving the models from `schema.py` keeps one declaration of each key:
every field is required, no field has a default, and an unknown key is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _typed(hint: Any) -> Any:
    if dataclasses.is_dataclass(hint):
        return model_of(hint)
    args = typing.get_args(hint)
    if not args:
        return hint
    origin = typing.get_origin(hint)
    mapped = tuple(_typed(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return functools.reduce(lambda a, b: a | b, mapped)
    return origin[mapped] if len(mapped) > 1 else origin[mapped[0]]


@functools.cache
def model_of(cls: type) -> type[BaseModel]:
    """The pydantic twin of a schema dataclass: same names and types, all required."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: (_typed(hints[f.name]), ...) for f in dataclasses.fields(cls)}
    return create_model(cls.__name__, __base__=Strict, __module__=__name__, **fields)
