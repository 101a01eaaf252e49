"""Settings declared once, as the fields of a :class:`Settings` dataclass: a field's type, default,
help, check and choices make its command-line flag and the check that runs however a config is
made (failing with the class's ``error``, which names the flag; from the flags, a usage error)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, ClassVar, Optional


def at_least(low: float):
    return lambda v: None if v is None or v >= low else f"must be >= {low:g}, got {v}"


def above(low: float):
    return lambda v: None if v is None or v > low else f"must be > {low:g}, got {v}"


def unit(v: Optional[float]) -> Optional[str]:
    return None if v is None or 0.0 <= v <= 1.0 else f"must be in [0, 1], got {v}"


def setting(default: Any = dataclasses.MISSING, help: Optional[str] = None, *, check=None, choices=None,
            flag: bool = True, nargs: Optional[str] = None, metavar: Optional[str] = None) -> Any:
    """A field: its default (a list is copied per config), check (value -> error or None), choices, help
    (``argparse.SUPPRESS`` hides the flag), a list's ``nargs`` ("+" unless given); ``flag=False``: no flag."""
    meta = dict(help=help, check=check, choices=choices, flag=flag, nargs=nargs, metavar=metavar)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Settings:
    """Base of a settings dataclass; a subclass's ``__post_init__`` adds the checks across fields."""
    error: ClassVar[type[Exception]] = ValueError

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            problem = meta["check"](value) if meta["check"] else None
            if problem is None and meta["choices"] and value is not None and value not in meta["choices"]:
                problem = f"must be one of {', '.join(meta['choices'])}, got {value!r}"
            if problem:
                raise self.error(f"{flag(f.name)} {problem}")

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """``p`` with a flag for each field (``flag=True``), as the field declares it."""
        hints = typing.get_type_hints(cls)
        for f in (f for f in dataclasses.fields(cls) if f.metadata["flag"]):
            meta, kind = f.metadata, hints[f.name]
            if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X]: X
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            kwargs = {"required": True} if default is dataclasses.MISSING else {"default": default}
            if kind is bool:
                kwargs["action"] = "store_true"
            else:
                if typing.get_origin(kind) is list:
                    (kind,), kwargs["nargs"] = typing.get_args(kind), meta["nargs"] or "+"
                kwargs.update(type=kind, choices=meta["choices"], metavar=meta["metavar"])
            p.add_argument(flag(f.name), help=meta["help"], **kwargs)
        return p

    @classmethod
    def from_arguments(cls, p: argparse.ArgumentParser, a: argparse.Namespace):
        """The config of parsed flags; a failed check is the parser's usage error (exit 2)."""
        try:
            return cls(**{f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if f.metadata["flag"]})
        except cls.error as e:
            p.error(str(e))
