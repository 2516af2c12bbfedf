"""Command lines built from config dataclasses: each setting is declared once, as a dataclass field whose
default, help text and command-line details (choices, metavar, aliases, deprecated spellings) sit together.

    @dataclass
    class RenderConfig:
        bundle: str = arg(help="avatar bundle directory", positional=True)
        render_size: int = arg(0, help="output height in pixels (0: the avatar's)", deprecated=("--size",))

    p = command_parser(__doc__)
    add_config_arguments(p, RenderConfig)          # --render-size N, "(default: 0)" in --help
    cfg = config_from_namespace(RenderConfig, p.parse_args(argv))

Every option's parser default is None ("not given"): :func:`config_from_namespace` starts from the dataclass
defaults, or from a ``base`` config (a named preset's values), and sets only what the command line gave, so
explicit flags override presets. ``--help`` prints the true default (or the one ``shown`` says, e.g. the
default preset's). Booleans are ``--flag/--no-flag``. A deprecated spelling still parses, to the same field,
and prints one warning line to stderr. Parse errors are one ``error: …`` line and exit code 2, like
:func:`avatar.base.errors.run_cli`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from types import UnionType
from typing import Any, Iterable

CLI = "cli"  # the metadata key of a field's command-line details


def arg(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
        flag: str | None = None, aliases: Iterable[str] = (), deprecated: Iterable[str] = (),
        values: dict[str, Any] | None = None, positional: bool = False, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line option.

    ``flag`` (default ``--field-name``) and ``aliases`` name the option; ``deprecated`` spellings still parse
    but warn. ``values`` maps the words the command line takes to the field's values (``{"zero": True, …}``).
    ``positional`` makes it a positional argument. Other keywords go to ``add_argument`` (choices, metavar,
    type, action, required …)."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "deprecated": tuple(deprecated),
            "values": values, "positional": positional, "kwargs": argparse_kwargs}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={CLI: meta})


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with :func:`arg`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if CLI in f.metadata]


def flag_of(cls: type, name: str) -> str:
    """The option a field is set with (``--render-size``): for error messages that name it."""
    f = next(f for f in cli_fields(cls) if f.name == name)
    return f.metadata[CLI]["flag"] or "--" + f.name.replace("_", "-")


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``error: …``, exit code 2), like every other error here."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def command_parser(doc: str | None, **kwargs: Any) -> CommandParser:
    """The parser of a command: its docstring as the description, kept as written."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    return CommandParser(description=doc, **kwargs)


def format_default(value: Any, values: dict[str, Any] | None = None) -> str:
    """How ``--help`` prints a default: on/off, 0.0005, a b c for a list, the word of a ``values`` mapping."""
    if values:
        value = next((word for word, v in values.items() if v == value), value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _inferred_kwargs(hint: Any) -> dict[str, Any]:
    """``type``/``action`` for a field annotation: bool → --flag/--no-flag, list[X] → repeatable, X | None → X."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0] if len(args) == 1 else str
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is list:
        return {"action": "append", "type": typing.get_args(hint)[0]}
    return {"type": hint} if hint in (int, float, str) else {}


def _warning_action(action_cls: type[argparse.Action], flag: str) -> type[argparse.Action]:
    class Deprecated(action_cls):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {option_string} is deprecated, use {flag}", file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    return Deprecated


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ActionsContainer, cls: type, *,
                         shown: Any = None, notes: dict[str, str] | None = None, only: Iterable[str] | None = None,
                         skip: Iterable[str] = ()) -> None:
    """One argument per :func:`arg` field of ``cls`` (``only`` those / not those in ``skip``), on ``parser`` or
    an argument group. ``--help`` prints each default as ``shown`` (an instance, e.g. the default preset's
    config) holds it, else the dataclass default; ``notes[name]`` is added beside it."""
    hints = typing.get_type_hints(cls)
    only = set(only) if only is not None else None
    notes = notes or {}
    for f in cli_fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        meta = f.metadata[CLI]
        inferred = {"choices": list(meta["values"])} if meta["values"] else _inferred_kwargs(hints[f.name])
        kwargs = {**inferred, **meta["kwargs"]}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = getattr(shown, f.name) if shown is not None else _field_default(f)
        help_text = meta["help"]
        if default == "":
            default = None  # nothing to print
        if not (required or kwargs.get("required")) and (default is not None or f.name in notes):
            said = [] if default is None else [format_default(default, meta["values"])]
            said += [notes[f.name]] if f.name in notes else []
            help_text += " (default: " + " ".join(said) + ")"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help: the text is printed as written
        if meta["positional"]:
            parser.add_argument(f.name, help=help_text, **kwargs)
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if required:
            kwargs.setdefault("required", True)
        action = parser.add_argument(flag, *meta["aliases"], dest=f.name, default=None, help=help_text, **kwargs)
        if meta["deprecated"]:
            kwargs.pop("action", None)
            kwargs.pop("required", None)
            parser.add_argument(*meta["deprecated"], dest=f.name, default=None, help=argparse.SUPPRESS,
                                action=_warning_action(type(action), flag), **kwargs)


def config_from_namespace(cls: type, ns: argparse.Namespace, base: Any = None, **extra: Any) -> Any:
    """The config the command line asks for: ``base`` (or the dataclass defaults), then every option given
    (not None), then ``extra``."""
    given = {}
    for f in cli_fields(cls):
        value = getattr(ns, f.name, None)
        if value is not None:
            values = f.metadata[CLI]["values"]
            given[f.name] = values[value] if values else value
    given.update(extra)
    return dataclasses.replace(base, **given) if base is not None else cls(**given)
