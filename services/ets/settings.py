"""One settings loader: environment variables and CLI flags generated from dataclass fields.

Owns how a setting is declared and read, for every configuration dataclass of the project
(search defaults, search service, SGLang launcher, reward server):

- ``setting()`` declares a field once: default, env var name(s), help, choices and bounds;
- ``from_env`` reads the declared variables (empty = unset; typed by the field's annotation;
  an unparsable or out-of-range value raises the class's ``FieldError`` naming the env var);
- ``add_flags`` / ``from_args`` generate one ``--field-name`` flag per setting (flags override
  the environment; errors name the flag and its env var);
- ``check`` applies the declared choices and bounds to a finished object (for objects built in
  code), naming the field or the env var.

So a new limit is one field: its env var, default, flag, help and validation live together, e.g.
``limit_width: int = setting(256, env="ETS_LIMIT_WIDTH", ge=1, help="largest config.width ...")`` in
``ServiceSettings``; ``ets settings --write docs/settings.md`` then refreshes the settings page's tables.
Env names may contain ``{prefix}`` (one dataclass read under several prefixes, e.g. the
launcher's ``ETS_POLICY_`` and ``ETS_PRM_SGLANG_``); several names mean "first one set wins".
Pure: reads only the mapping it is given (``os.environ`` by default), no other I/O.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence, TypeVar, Union

from ets.errors import FieldError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

_KEY = "ets.setting"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Spec:
    """How one dataclass field is read: env names (``{prefix}`` filled in), flag, help, checks."""

    env: tuple[str, ...]
    help: str = ""
    # CLI flag; None derives ``--field-name``, "" means the setting has no flag.
    flag: str | None = None
    choices: tuple[str, ...] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    # Custom text -> value conversion (raise ValueError with the reason); default: by annotation.
    parse: Callable[[str], Any] | None = None
    # Case-insensitive values (device names): lower-cased before checks.
    lower: bool = False
    # Surrounding whitespace is dropped unless it is part of the value (templates, token strings).
    strip: bool = True


def setting(default: Any = dataclasses.MISSING, *, env: str | Sequence[str] | None = None, help: str = "",
            flag: str | None = None, choices: Sequence[str] | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            parse: Callable[[str], Any] | None = None, lower: bool = False, strip: bool = True,
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also a setting (see the module docstring).

    ``env=None`` reads ``{prefix}FIELD_NAME``.
    """
    names: tuple[str, ...] | None = None
    if env is not None:
        names = (env,) if isinstance(env, str) else tuple(env)
    spec = Spec(env=names or (), help=help, flag=flag, choices=tuple(choices) if choices is not None else None,
                ge=ge, gt=gt, le=le, lt=lt, parse=parse, lower=lower, strip=strip)
    meta = {_KEY: spec}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Setting:
    """One resolved setting of a dataclass: its field, spec and annotated type."""

    name: str
    spec: Spec
    type: Any
    default: Any

    def env_names(self, prefix: str = "") -> tuple[str, ...]:
        names = self.spec.env or ("{prefix}" + self.name.upper(),)
        return tuple(n.format(prefix=prefix) for n in names)

    @property
    def flag(self) -> str | None:
        if self.spec.flag == "":
            return None
        return self.spec.flag or "--" + self.name.replace("_", "-")

    def parse(self, raw: str) -> Any:
        """Text -> value (ValueError with the reason); the spec's checks applied."""
        text = raw.strip() if self.spec.strip else raw
        value = self.spec.parse(text) if self.spec.parse is not None else parse_as(self.type, text)
        if self.spec.lower and isinstance(value, str):
            value = value.lower()
        self.validate(value)
        return value

    def validate(self, value: Any) -> None:
        """Raise ValueError (the reason) when ``value`` breaks the declared choices or bounds."""
        s = self.spec
        if value is None:
            return
        if s.choices is not None and value not in s.choices:
            raise ValueError(f"must be one of {list(s.choices)}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low = f"[{s.ge:g}" if s.ge is not None else f"({s.gt:g}" if s.gt is not None else None
            high = f"{s.le:g}]" if s.le is not None else f"{s.lt:g})" if s.lt is not None else None
            if (s.ge is not None and value < s.ge) or (s.gt is not None and value <= s.gt) \
                    or (s.le is not None and value > s.le) or (s.lt is not None and value >= s.lt):
                if low and high:
                    raise ValueError(f"must be in {low}, {high}, got {value!r}")
                bound = f">= {s.ge:g}" if s.ge is not None else f"> {s.gt:g}" if s.gt is not None \
                    else f"<= {s.le:g}" if s.le is not None else f"< {s.lt:g}"
                raise ValueError(f"must be {bound}, got {value!r}")


def settings_of(cls: type, *, every_field: bool = False) -> list[Setting]:
    """The settings of dataclass ``cls`` in field order.

    Fields declared with ``setting()`` only, unless ``every_field``: then every field is one,
    read from ``{prefix}FIELD_NAME`` (a dataclass whose fields all mirror env vars one to one).
    """
    hints = typing.get_type_hints(cls)
    out: list[Setting] = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_KEY)
        if spec is None:
            if not every_field:
                continue
            spec = Spec(env=())
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(Setting(f.name, spec, hints[f.name], default))
    return out


# ---- parsing by annotation --------------------------------------------------------------------

def _optional_inner(tp: Any) -> Any:
    """``X`` of ``X | None`` / ``Optional[X]``; ``tp`` itself otherwise."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"must be a boolean (1/0/true/false/yes/no/on/off), got {text!r}")


def parse_as(tp: Any, text: str) -> Any:
    """Convert ``text`` to the annotated type ``tp`` (ValueError with a readable reason).

    Supported: str, int, float (finite), bool, ``tuple[int, ...]`` (comma-separated; empty ->
    None), ``tuple[str, ...]`` (whitespace-separated), and ``X | None`` of those.
    """
    tp = _optional_inner(tp)
    if tp is str:
        return text
    if tp is bool:
        return parse_bool(text)
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"must be an integer, got {text!r}") from None
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {text!r}")
        return value
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if item is int:
            try:
                ints = tuple(int(x) for x in text.split(",") if x.strip())
            except ValueError:
                raise ValueError(f"must be a comma-separated list of integers, got {text!r}") from None
            return ints or None
        if item is str:
            return tuple(text.split())
    raise TypeError(f"no parser for settings of type {tp!r}")


# ---- environment --------------------------------------------------------------------------------

def _set(env: Mapping[str, str], names: Sequence[str]) -> Iterator[tuple[str, str]]:
    for name in names:
        raw = env.get(name)
        if raw is not None and raw.strip() != "":
            yield name, raw


def env_values(cls: type, env: Mapping[str, str] | None = None, *, prefix: str = "",
               error: type[FieldError] = FieldError, every_field: bool = False) -> dict[str, Any]:
    """``{field: value}`` for every setting of ``cls`` whose env var is set (first name wins).

    Raises ``error(ENV_NAME, reason)`` for an unparsable or out-of-range value.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for s in settings_of(cls, every_field=every_field):
        for name, raw in _set(env, s.env_names(prefix)):
            try:
                values[s.name] = s.parse(raw)
            except ValueError as exc:
                raise error(name, str(exc)) from None
            break
    return values


def from_env(cls: type[T], env: Mapping[str, str] | None = None, *, prefix: str = "",
             base: T | None = None, error: type[FieldError] = FieldError) -> T:
    """``base`` (default: ``cls()``) with the settings found in ``env`` applied."""
    values = env_values(cls, env, prefix=prefix, error=error)
    return dataclasses.replace(base if base is not None else cls(), **values)


# ---- command line -------------------------------------------------------------------------------

def _describe(s: Setting, prefix: str) -> str:
    parts = [s.spec.help] if s.spec.help else []
    if s.spec.choices:
        parts.append("one of " + "|".join(s.spec.choices))
    parts.append(" / ".join(s.env_names(prefix)))
    if isinstance(s.default, bool):
        parts.append(f"default {'on' if s.default else 'off'}")
    elif s.default not in (None, "", ()):
        parts.append(f"default {s.default}")
    return "; ".join(parts)


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *, prefix: str = "",
              exclude: Sequence[str] = ()) -> None:
    """One flag per setting of ``cls`` (default None = keep the environment's / default value).

    Values stay text here; ``from_args`` parses them so errors name the flag and its env var.
    Booleans get ``--flag`` / ``--no-flag``.
    """
    for s in settings_of(cls):
        if s.flag is None or s.name in exclude:
            continue
        help_text = _describe(s, prefix).replace("%", "%%")
        if _optional_inner(s.type) is bool:
            parser.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.name.upper(), help=help_text)


def args_values(cls: type, args: argparse.Namespace, *, prefix: str = "",
                error: type[FieldError] = FieldError) -> dict[str, Any]:
    """``{field: value}`` for the flags of ``cls`` given on the command line (parsed, checked)."""
    values: dict[str, Any] = {}
    for s in settings_of(cls):
        raw = getattr(args, s.name, None) if s.flag is not None else None
        if raw is None:
            continue
        try:
            if isinstance(raw, bool):
                s.validate(raw)
                values[s.name] = raw
            else:
                values[s.name] = s.parse(raw)
        except ValueError as exc:
            raise error(f"{s.flag} ({' / '.join(s.env_names(prefix))})", str(exc)) from None
    return values


def from_args(cls: type[T], args: argparse.Namespace, *, env: Mapping[str, str] | None = None,
              prefix: str = "", base: T | None = None, error: type[FieldError] = FieldError) -> T:
    """``base`` (default ``cls()``) with the environment applied, then the flags given."""
    config = from_env(cls, env, prefix=prefix, base=base, error=error)
    return dataclasses.replace(config, **args_values(cls, args, prefix=prefix, error=error))


# ---- checks on finished objects -----------------------------------------------------------------

def check(obj: Any, *, error: type[FieldError] = FieldError, naming: Literal["field", "env"] = "field",
          prefix: str = "") -> None:
    """Apply every declared choice and bound to ``obj``'s current values.

    Raises ``error(name, reason)`` for the first violation; ``name`` is the field name, or its
    (first) env var with ``naming="env"``.
    """
    for s in settings_of(type(obj)):
        value = getattr(obj, s.name)
        if s.spec.lower and isinstance(value, str):
            value = value.lower()
        try:
            s.validate(value)
        except ValueError as exc:
            raise error(s.env_names(prefix)[0] if naming == "env" else s.name, str(exc)) from None


def table(cls: type, *, prefix: str = "", every_field: bool = False) -> str:
    """A markdown table of ``cls``'s settings (env var, flag, default, meaning) for docs."""
    rows = ["| env | flag | default | meaning |", "|---|---|---|---|"]
    for s in settings_of(cls, every_field=every_field):
        if isinstance(s.default, bool):
            default = "on" if s.default else "off"
        else:
            # One table line per setting: newlines shown as \n, a literal | escaped.
            text = str(s.default).replace("\n", "\\n").replace("|", "\\|")
            default = "-" if s.default in (None, "", ()) else f"`{text}`"
        meaning = "; ".join(x for x in (s.spec.help, "one of " + ", ".join(f"`{c}`" for c in s.spec.choices)
                                        if s.spec.choices else "") if x)
        flag = f"`{s.flag}`" if s.flag and not every_field else "-"
        meaning = meaning.replace("|", "\\|")  # a literal | would split the Markdown cell
        rows.append(f"| {' / '.join(f'`{n}`' for n in s.env_names(prefix))} | {flag} | {default} | {meaning} |")
    return "\n".join(rows)
