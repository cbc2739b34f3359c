"""Command-line flags generated from the config dataclasses.

Every stage takes one frozen config dataclass that holds its defaults and, in
its ``Args:`` docstring, what each field means. The ``hashray`` parsers are
built from those classes here, so a flag's name, type, default, choices and
help cannot drift from the config the stage code runs with.

Only ``choices`` are enforced by argparse; every other check of a value stays
in the stage code (a ``HashrayError`` naming the flag), so the command line,
the Python API and ``serve deploy`` reject the same values the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

Config = TypeVar("Config")
SCALAR_TYPES = (int, float, str)
# "name: text" or "a, b: text" at the entry indentation of an Args: section.
_ENTRY = re.compile(r"(\w+(?:\s*,\s*\w+)*)\s*:\s*(.*)")
_OWN_DEFAULT = "(default:"


def flag_name(field_name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + field_name.replace("_", "-")


def docstring_args(doc: str | None) -> dict[str, str]:
    """Field name -> help text, from the Google-style ``Args:`` section of ``doc``.

    An entry is ``name: text`` or ``a, b: text`` (the text then serves each
    name); lines indented deeper continue the entry above. The section ends
    at the first line indented no deeper than ``Args:`` itself. Sphinx
    literal markup (````x````) is dropped: the text is for a terminal.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Args:"]
    if not starts:
        return {}
    section_indent = _indent(lines[starts[0]])
    entry_indent: int | None = None
    helps: dict[str, str] = {}
    names: list[str] = []
    for line in lines[starts[0] + 1 :]:
        if not line.strip():
            continue
        indent = _indent(line)
        if indent <= section_indent:
            break
        entry_indent = indent if entry_indent is None else entry_indent
        match = _ENTRY.fullmatch(line.strip()) if indent == entry_indent else None
        if match:
            names = re.split(r"\s*,\s*", match[1])
            helps.update(dict.fromkeys(names, match[2]))
        else:
            helps.update({name: f"{helps[name]} {line.strip()}" for name in names})
    return {name: text.replace("``", "") for name, text in helps.items()}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    base: Any = None,
    skip: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
    required: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
    presets: Mapping[str, Any] | None = None,
) -> None:
    """Add one flag per field of the dataclass ``cls`` to ``parser``, in field order.

    Each flag's ``dest`` is its field name, which is what
    :func:`config_from_args` reads back.

    Args:
        parser: the parser or argument group to add to.
        cls: the config dataclass; its ``Args:`` docstring gives each flag's help.
        base: an instance of ``cls`` whose values are the defaults (default:
            the dataclass's own defaults).
        skip: fields that get no flag (the caller sets them).
        rename: field -> flag, e.g. ``{"train_list": "--train"}``; wins over
            ``field.metadata["flag"]``, which wins over :func:`flag_name`.
        required: fields that must be given although they have a default
            (fields without a default always must).
        defaults: field -> default, for this parser only.
        helps: field -> help, for this parser only. A help that states its
            own ``(default: ...)`` keeps it, here and in the docstring.
        presets: flag -> instance of ``cls`` that the flag selects, e.g.
            ``{"--quick": QUICK}``. The fields' flags then get no argparse
            default, so that ``config_from_args(cls, args, base=preset)`` lays
            only the flags actually given over the preset; each help shows
            the default both with and without the preset.

    Raises:
        TypeError: a field has no help, or a type with no flag form.
    """
    rename, defaults, helps, presets = rename or {}, defaults or {}, helps or {}, presets or {}
    skipped, forced = set(skip), set(required)
    hints = typing.get_type_hints(cls)
    docs = docstring_args(cls.__doc__)
    for field in dataclasses.fields(cls):
        if field.name in skipped or not field.init:
            continue
        flag = rename.get(field.name) or field.metadata.get("flag") or flag_name(field.name)
        kind = scalar_type(hints[field.name], f"{cls.__name__}.{field.name}")
        default = defaults[field.name] if field.name in defaults else _default(field, base)
        text = helps.get(field.name) or docs.get(field.name)
        if not text:
            raise TypeError(f"{cls.__name__}.{field.name} has no help: add it to the Args: section of its docstring")
        if field.name in forced or default is dataclasses.MISSING:
            presence: dict[str, Any] = {"required": True, "help": _escape(text)}
        else:
            preset_values = [(name, getattr(preset, field.name)) for name, preset in presets.items()]
            presence = {
                "default": argparse.SUPPRESS if presets else default,
                "help": _escape(_with_default(text, default, preset_values, kind, flag)),
            }
        parser.add_argument(
            flag, dest=field.name, **presence, **_value_options(kind, field.metadata.get("choices"), flag)
        )


def scalar_type(annotation: Any, where: str) -> type:
    """The flag type of a field annotation: ``int``, ``float``, ``str``, ``bool``, or one of them ``| None``."""
    if annotation in (*SCALAR_TYPES, bool):
        return annotation
    members = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(members) == 2 and type(None) in members:
        (kind,) = [member for member in members if member is not type(None)]
        if kind in SCALAR_TYPES:
            return kind
    raise TypeError(f"{where}: no command-line flag for type {annotation!r}")


def _value_options(kind: type, choices: Iterable[Any] | None, flag: str) -> dict[str, Any]:
    """How argparse reads the value: a ``--x/--no-x`` switch for a bool, else a typed value."""
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    metavar = None if choices else flag.lstrip("-").upper().replace("-", "_")  # argparse shows {a,b,c} for choices
    return {"type": kind, "choices": choices, "metavar": metavar}


def _default(field: dataclasses.Field, base: Any) -> Any:
    """The field's value in ``base``, else its dataclass default (``MISSING`` when it has none)."""
    if base is not None:
        return getattr(base, field.name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _with_default(text: str, default: Any, presets: list[tuple[str, Any]], kind: type, flag: str) -> str:
    """``text (default: 8; 2 with --quick)``; a preset that changes nothing is not mentioned."""
    if _OWN_DEFAULT in text:
        return text
    parts = [_show(default, kind, flag)] + [
        f"{_show(value, kind, flag)} with {name}" for name, value in presets if value != default
    ]
    return f"{text.rstrip('.')} (default: {'; '.join(parts)})"


def _show(value: Any, kind: type, flag: str) -> str:
    """A default as the user would write it: ``--gpu``/``--no-gpu`` for a switch, ``none`` when unset."""
    if kind is bool:
        return flag if value else "--no-" + flag[2:]
    return "none" if value is None else str(value)


def _escape(text: str) -> str:
    """argparse %-formats help strings."""
    return text.replace("%", "%%")


def config_from_args(
    cls: type[Config], args: argparse.Namespace, *, base: Config | None = None, **overrides: Any
) -> Config:
    """The ``cls`` instance that the parsed ``args`` describe.

    Each field comes from, lowest first: ``base`` (or the dataclass default),
    the attribute of ``args`` named after it, then ``overrides``. Attributes
    of ``args`` that are no field (``handler``, ``address``...) are ignored.
    """
    names = {field.name for field in dataclasses.fields(cls) if field.init}
    values = {name: value for name, value in vars(args).items() if name in names} | overrides
    return dataclasses.replace(base, **values) if base is not None else cls(**values)
