"""Command-line flags derived from the settings models (config/): each flag's default and help come from its
field, so a setting is written once."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from .config import AuthSettings
from .settings_base import Settings as _Settings
from .settings_base import env_name as _env_name


def shown_default(info: FieldInfo) -> str:
    """A field's default as the help shows it (a default_factory is called: what this machine would use)."""
    value = info.get_default(call_default_factory=True)
    if value is None or value == "" or value == [] or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _flag_options(model: type[_Settings], field: str, info: FieldInfo) -> dict[str, Any]:
    annotation = info.annotation
    if get_origin(annotation) in (Union, UnionType):  # X | None: the flag gives an X
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return {"choices": get_args(annotation)}
    if annotation in (str, int, float):
        return {"type": annotation}
    raise TypeError(f"{model.__name__}.{field}: no flag for a {annotation}")


def add_flag(
    parser: argparse.ArgumentParser, model: type[_Settings], field: str, *flags: str, dest: str | None = None
) -> None:
    """Add `--flag` for a settings field: its help is the field's description plus "(env VAR, default X)", its
    value (None when not given, so that from_env falls back to the environment, then the default) lands in
    `dest` (the field name unless given). `flag_values(args, model)` collects them for `model.from_env`."""
    info = model.model_fields[field]
    dest = dest or field
    help_text = f"{info.description} (env {_env_name(model, field)}, default {shown_default(info)})"
    options = _flag_options(model, field, info)
    if "choices" not in options:
        options["metavar"] = _env_name(model, field)  # --db MANAGER_DB: the flag sets that variable's setting
    parser.add_argument(*flags, dest=dest, default=None, help=help_text.replace("%", "%%"), **options)
    owned = dict(parser.get_default("settings_flags") or {})  # a copy: each parser keeps its own
    owned[(model.__name__, field)] = dest
    parser.set_defaults(settings_flags=owned)


def flag_values(args: argparse.Namespace, model: type[_Settings]) -> dict[str, Any]:
    """The values of the (sub)command's `add_flag` flags for `model`'s fields, by field name (None: not given)."""
    owned: dict[tuple[str, str], str] = getattr(args, "settings_flags", None) or {}
    return {field: getattr(args, dest) for (name, field), dest in owned.items() if name == model.__name__}


def env_help(*models: type[_Settings]) -> str:
    """The environment variables of these models, one line each: a command's help epilog."""
    lines = ["environment variables (flags override them; empty = unset):"]
    for var, info in dict(_variables(models)).items():
        lines.append(f"  {var:<25} {info.description} (default {shown_default(info)})")
    return "\n".join(lines)


def _variables(models: tuple[type[_Settings], ...]) -> Iterator[tuple[str, FieldInfo]]:
    for model in models:
        for field, info in model.model_fields.items():
            yield _env_name(model, field), info


def command_parser(
    sub: Any, name: str, help: str, *models: type[_Settings], description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand whose help ends with the environment variables of its settings (and of AuthSettings)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=env_help(*models, AuthSettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser
