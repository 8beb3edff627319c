"""Command-line plumbing shared by every script: the parser (:class:`ScriptParser`: a bad flag is one
line), boolean flags, value checks, typed configs as flags, and ``--config FILE``.

A config is a frozen dataclass whose fields carry their defaults and help
(``field(default=..., metadata={"help": "..."})``); :func:`add_config_args` turns its fields into
flags and :func:`config_from_args` builds the config back from the parsed namespace, so each
default is written exactly once, in the dataclass.

A config file (:func:`add_config_file_arg`) is TOML whose keys are the script's flag names without
``--`` (``lr = 0.01``, ``scale_list = [0.5, 1.0]``, ``use_pca = false``); each value is read as
the flag reads its text, the flags given on the command line win, and :func:`parse_args_given`
counts the file's keys as given.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

C = TypeVar("C")
Container = argparse.ArgumentParser | argparse._ArgumentGroup  # noqa: SLF001 (argparse has no public name)


class ScriptParser(argparse.ArgumentParser):
    """The scripts' parser: a bad flag or value prints one line and where to find the flags,
    not the whole usage block, and exits with status 2 (as argparse does)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog} --help lists the flags\n")


def number(value: str | int | float, kind: type[int] | type[float]) -> int | float:
    """``kind(value)``, or argparse's message for a word that is not one (for the checks below)."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {value!r}") from None


def positive_int(value: str | int) -> int:
    """argparse type: an integer >= 1."""
    n = number(value, int)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def non_negative_int(value: str | int) -> int:
    """argparse type: an integer >= 0."""
    n = number(value, int)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return n


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


class ConfigFileError(ValueError):
    """A config file that cannot be used; the message names the file and the reason."""


def add_config_file_arg(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: flag values from a TOML file (read by :func:`parse_args_given`)."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML file of flag values, keys being the flag names without -- (e.g. lr = 0.01, "
                             "scale_list = [0.5, 1.0], use_pca = false); flags on the command line win")


def _toml_text(value: Any) -> str:
    """``value`` as a TOML file writes it (for messages)."""
    return json.dumps(value) if isinstance(value, (str, bool, list)) else str(value)


def _flag_word(action: argparse.Action, value: Any) -> Any:
    """One TOML value read as ``action`` reads a command-line word: through its ``type``, then
    checked against its ``choices``. Booleans go to boolean flags only, and only booleans do."""
    boolean = action.type is str2bool
    if isinstance(value, bool) != boolean:
        raise ValueError("expected true or false" if boolean else "expected a string or a number, got a boolean")
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a string, a number or a boolean, got {type(value).__name__}")
    text = value if isinstance(value, (str, bool)) else str(value)
    try:
        result = action.type(text) if action.type is not None else text
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None
    except (TypeError, ValueError):
        raise ValueError(f"invalid {getattr(action.type, '__name__', 'value')} value: {text!r}") from None
    if action.choices is not None and result not in action.choices:
        raise ValueError(f"invalid choice: {result!r} (choose from {', '.join(map(str, action.choices))})")
    return result


def _flag_value(action: argparse.Action, value: Any) -> Any:
    """A TOML value for ``action``: an array for a flag taking several values, else one value."""
    if isinstance(value, dict):
        raise ValueError("expected a value, got a table")
    if action.nargs == 0:
        raise ValueError("a flag that takes no value cannot be set from a file")
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            raise ValueError("expected an array (the flag takes several values)")
        if action.nargs == "+" and not value:
            raise ValueError("expected at least one value")
        return [_flag_word(action, v) for v in value]
    if isinstance(value, list):
        raise ValueError("expected one value, got an array")
    return _flag_word(action, value)


def read_config_file(parser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """The flag values (destination -> value, as the flags' ``type`` makes them) of TOML file
    ``path``, whose keys are ``parser``'s long flag names without ``--``; ConfigFileError names the
    file and the first unknown key, wrong value or TOML syntax error."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read it ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{path}: not a valid TOML file ({e})") from None
    flags = {opt[2:]: action for action in parser._actions  # noqa: SLF001 (argparse has no public list)
             for opt in action.option_strings if opt.startswith("--") and action.dest not in ("help", "config")}
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, value in data.items():
        action = flags.get(key)
        if action is None:
            close = difflib.get_close_matches(key, flags, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (keys are the flag names without --, see --help)"
            raise ConfigFileError(f"{path}: unknown key {key!r}: no such flag{hint}")
        if action.dest in keys:
            raise ConfigFileError(f"{path}: {keys[action.dest]!r} and {key!r} both set --{action.dest}")
        try:
            values[action.dest] = _flag_value(action, value)
        except ValueError as e:
            raise ConfigFileError(f"{path}: {key} = {_toml_text(value)}: {e}") from None
        keys[action.dest] = key
    return values


def _config_file_path(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> Path | None:
    """The ``--config`` of ``argv``, found as ``parser`` finds it (abbreviations included), before
    the file can supply required flags."""
    words = sys.argv[1:] if argv is None else argv
    if not any(len(w) > 2 and "--config".startswith(w.split("=", 1)[0]) for w in words):
        return None  # (so that --help alone shows the required flags as required)
    saved = [(action, action.required) for action in parser._actions]  # noqa: SLF001
    try:
        for action, _ in saved:
            action.required = False
        known, _ = parser.parse_known_args(argv)
    finally:
        for action, required in saved:
            action.required = required
    return getattr(known, "config", None)


def parse_args_given(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` plus ``given_flags``: the destinations the command line set
    (found by parsing again with every default suppressed) or the ``--config`` file set.

    When ``parser`` has :func:`add_config_file_arg`'s flag and ``argv`` names a file, its values
    become the defaults (a flag it sets is no longer required), so the command line wins; a bad
    file exits (status 2) with one line naming it."""
    from_file: dict[str, Any] = {}
    if any(action.dest == "config" for action in parser._actions):  # noqa: SLF001
        path = _config_file_path(parser, argv)
        if path is not None:
            try:
                from_file = read_config_file(parser, path)
            except ConfigFileError as e:
                parser.exit(2, f"error: {e}\n")
            parser.set_defaults(**from_file)
            for action in parser._actions:  # noqa: SLF001
                if action.dest in from_file:
                    action.required = False
    args = parser.parse_args(argv)
    saved = [(action, action.default) for action in parser._actions]  # noqa: SLF001
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given = vars(parser.parse_args(argv))
    finally:
        for action, default in saved:
            action.default = default
    args.given_flags = frozenset(given) | frozenset(from_file)
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
