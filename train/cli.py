"""Command-line plumbing shared by every script: boolean flags, and typed configs as flags.

A config is a frozen dataclass whose fields carry their defaults and help
(``field(default=..., metadata={"help": "..."})``); :func:`add_config_args` turns its fields into
flags and :func:`config_from_args` builds the config back from the parsed namespace, so each
default is written exactly once, in the dataclass.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

C = TypeVar("C")
Container = argparse.ArgumentParser | argparse._ArgumentGroup  # noqa: SLF001 (argparse has no public name)


def str2bool(value: str | bool) -> bool:
    """argparse type for booleans: true/false, 1/0, yes/no (any case)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("true", "1", "yes", "y"):
        return True
    if v in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0, got {value!r}")


def add_bool_flag(parser: Container, *names: str, default: bool, help: str, dest: str | None = None) -> None:
    """The one style of boolean option: ``--x`` alone means true; ``--x true|false|1|0`` works too
    (the seed README writes ``--use_random_gamma_scaling true``)."""
    extra = {"dest": dest} if dest else {}
    parser.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL",
                        help=help, **extra)


def add_config_args(parser: Container, cls: type, rename: dict[str, str] | None = None,
                    skip: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass ``cls`` (``--<field>``, or ``--<rename[field]>``), with the
    field's default, type and ``metadata["help"]``. bool fields become :func:`add_bool_flag`
    options; ``tuple[float, ...]``/``list`` fields take several values; ``X | None`` fields take X.

    Optional metadata: ``choices``; ``type`` (a parser/validator used instead of the annotated
    type, e.g. one that rejects negative numbers with an ``argparse.ArgumentTypeError``);
    ``aliases`` (more flag names); ``group`` (the title of the ``--help`` section the flag is
    listed under; sections are made in field order, on a parser only, not inside a group)."""
    hints = typing.get_type_hints(cls)
    rename = rename or {}
    groups: dict[str, Container] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        meta = f.metadata
        names = ("--" + rename.get(f.name, f.name), *(meta.get("aliases") or ()))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = meta.get("help", "")
        target = parser
        if meta.get("group") and isinstance(parser, argparse.ArgumentParser):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        kind = hints[f.name]
        if kind is bool:
            add_bool_flag(target, *names, default=default, help=help_text, dest=f.name)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        if meta.get("choices") is not None:
            kwargs["choices"] = meta["choices"]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (tuple, list):
            kwargs.update(type=args[0], nargs="+")
            kwargs["default"] = list(default)
        elif type(None) in args:  # Optional[X]
            kwargs["type"] = next(a for a in args if a is not type(None))
        else:
            kwargs["type"] = kind
        if meta.get("type") is not None:
            kwargs["type"] = meta["type"]
        target.add_argument(*names, **kwargs)


def parse_args_given(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` plus ``given_flags``: the destinations the command line set
    (found by parsing again with every default suppressed)."""
    args = parser.parse_args(argv)
    saved = [(action, action.default) for action in parser._actions]  # noqa: SLF001
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given = vars(parser.parse_args(argv))
    finally:
        for action, default in saved:
            action.default = default
    args.given_flags = frozenset(given)
    return args


def config_from_args(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """An instance of dataclass ``cls`` from the namespace filled by :func:`add_config_args`
    (list values become tuples where the field is a tuple); ``overrides`` win."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if typing.get_origin(hints[f.name]) is tuple and value is not None:
            value = tuple(value)
        values[f.name] = value
    values.update(overrides)
    return cls(**values)
