"""The settings schema: each setting is declared once, as a config dataclass field made with
``setting()``; its TOML key, CLI flag, ``TENSORBRIDGE_*`` environment twin, checks and the
settings table of docs/operations.md are all derived from that declaration.

Adding a setting is one line in ``ServerConfig`` (``_config.py``) or ``ModelConfig``
(``_models.py``)::

    max_widgets: int = setting(8, minimum=1, help="widgets per connection")

The field's annotation gives the type (``int``, ``float``, ``str``, ``bool``, ``str | None``,
``list[int]``, tables); ``kind=`` picks a special reading (``MODE``: octal file mode, ``MIB``:
a size written in MiB and held in bytes).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import TensorBridgeError

__all__ = ["ConfigError", "MIB", "MODE", "Setting", "schema", "setting"]

#: Kinds of value a setting holds; derived from the field's annotation unless given.
INT, FLOAT, STR, BOOL, INTS, TABLE, LIST = "int", "float", "str", "bool", "ints", "table", "list"
#: Any TOML value; ``check`` (and ``accepts``) say which.
ANY = "any"
#: A file mode written the ``chmod`` way (``"660"``, ``0o660``).
MODE = "mode"
#: A size written in MiB (``region_cap_mb = 256``), held in bytes.
MIB = "mib"
_FROM_ANNOTATION = {"int": INT, "float": FLOAT, "str": STR, "bool": BOOL, "list[int]": INTS,
                    "Any": ANY}
_SCOPES = {"ServerConfig": "server", "ModelConfig": "model"}
#: Marks a setting without a default (the model's ``source``).
REQUIRED: Any = dataclasses.MISSING


class ConfigError(TensorBridgeError, ValueError):
    """A setting is wrong: unknown key, wrong type, out of range, missing file or factory.

    The message names where (file and table, environment variable or flag), the key, the
    value and what is allowed; ``tensorbridge serve`` stops with exit code 2 before binding.
    """


@dataclass(frozen=True)
class _Declared:
    """What ``setting()`` stores in the field's metadata until ``schema()`` completes it."""

    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    kind: str | None = None
    key: str | None = None
    cli: bool = True
    doc_default: str | None = None
    check: Callable[[Any], str | None] | None = None
    accepts: str | None = None


def setting(default: Any = REQUIRED, *, help: str,  # noqa: A002 - argparse's word for it
            minimum: float | None = None, maximum: float | None = None,
            choices: Iterable[str] | None = None, kind: str | None = None,
            key: str | None = None, cli: bool = True, doc_default: str | None = None,
            default_factory: Callable[[], Any] | None = None,
            check: Callable[[Any], str | None] | None = None,
            accepts: str | None = None) -> Any:
    """Declare one setting as a dataclass field (see the module docstring).

    ``key`` is the TOML key when it differs from the field name (``region_cap_mb`` for
    ``region_cap``); ``cli=False`` leaves out the flag and environment twin (tables);
    ``check`` returns why a parsed value is wrong, or None; ``doc_default`` is the default as
    the docs table shows it; ``accepts`` says in words what ``check`` lets through.
    """
    meta = {"setting": _Declared(help, minimum, maximum,
                                 tuple(choices) if choices is not None else None, kind, key,
                                 cli, doc_default, check, accepts)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Setting:
    """One setting of the schema: where it is written and what it accepts."""

    name: str  #: attribute of the config object
    key: str  #: TOML key, flag and environment names derive from it
    kind: str
    scope: str  #: ``server`` or ``model`` (a ``[models.NAME]`` key)
    help: str
    default: Any
    nullable: bool
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...] | None
    cli: bool
    doc_default: str | None
    check: Callable[[Any], str | None] | None
    accepts: str | None

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--region-cap-mb``."""
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        """The environment twin, e.g. ``TENSORBRIDGE_REGION_CAP_MB``."""
        return "TENSORBRIDGE_" + self.key.upper()

    @property
    def repeatable(self) -> bool:
        """Given several times on the command line (a list of ids)."""
        return self.kind == INTS

    def allowed(self) -> str:
        """What the setting accepts, in words."""
        if self.accepts is not None:
            return self.accepts
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = {INT: "an integer", FLOAT: "a number", STR: "a string", BOOL: "true or false",
                    INTS: "a list of integers", TABLE: "a table", LIST: "a list",
                    MODE: 'an octal file mode such as "660"', MIB: "a size in MiB",
                    ANY: "any value"}[self.kind]
            text += _range(self.minimum, self.maximum)
        return text + (" (or empty: unset)" if self.nullable and self.kind == STR else "")

    def shown_default(self) -> str:
        """The default as written in the config file."""
        if self.doc_default is not None:
            return self.doc_default
        value = self.default
        if self.kind == MODE:
            return f"`{value:o}`"
        if self.kind == MIB:
            return _number_text(value / (1 << 20))
        if value is None:
            return "none"
        if isinstance(value, (list, dict)) and not value:
            return "none"
        if isinstance(value, str):
            return f"`{value}`"
        if isinstance(value, bool):
            return "true" if value else "false"
        return _number_text(value)

    def parse(self, value: Any, where: str, textual: bool = False) -> Any:
        """Check ``value`` (from TOML, or a string from a flag/environment when ``textual``)
        and return what the config object holds; ``ConfigError`` names ``where``."""
        try:
            parsed = self._parse(value, textual)
            problem = self._out_of_range(parsed)
        except TypeError:
            problem = f"wrong type ({_type_name(value)})"
        except ValueError:
            problem = "invalid value"
        if problem is None and self.check is not None and parsed is not None:
            problem = self.check(parsed)
        if problem is not None:
            near = difflib.get_close_matches(str(value), self.choices or (), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{where} {self.key} = {_show(value)}: {problem}; "
                              f"allowed: {self.allowed()}{hint}")
        if self.kind == MIB:
            return int(parsed * (1 << 20))
        return parsed

    def _parse(self, value: Any, textual: bool) -> Any:
        if self.nullable and (value is None or (textual and value == "")):
            return None
        kind = self.kind
        if isinstance(value, bool) and kind != BOOL:
            raise TypeError
        if kind == INT:
            if textual:
                return int(str(value).strip())
            if not isinstance(value, int):
                raise TypeError
            return value
        if kind in (FLOAT, MIB):
            if textual:
                return float(str(value).strip())
            if not isinstance(value, (int, float)):
                raise TypeError
            return float(value)
        if kind == STR:
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind == BOOL:
            return _parse_bool(value, textual)
        if kind == INTS:
            items = value.split(",") if textual and isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise TypeError
            out = []
            for item in items:
                if isinstance(item, str) and textual:
                    if item.strip():
                        out.append(int(item.strip()))
                elif isinstance(item, int) and not isinstance(item, bool):
                    out.append(item)
                else:
                    raise TypeError
            return out
        if kind == MODE:
            return parse_mode(value)
        if kind == TABLE:
            if not isinstance(value, Mapping):
                raise TypeError
            return dict(value)
        if kind == LIST:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return list(value)
        if kind == ANY:
            return value
        raise AssertionError(kind)

    def _out_of_range(self, value: Any) -> str | None:
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return "unknown choice"
        if self.kind == MODE and not 0 <= value <= 0o777:
            return "not a permission mode (000..777)"
        numbers = value if self.kind == INTS else [value]
        for number in numbers if self.kind in (INT, FLOAT, MIB, INTS) else ():
            if self.minimum is not None and number < self.minimum:
                return "out of range"
            if self.maximum is not None and number > self.maximum:
                return "out of range"
        return None


def schema(cls: type) -> tuple[Setting, ...]:
    """The settings declared on a config dataclass, in declaration order."""
    cached = _SCHEMAS.get(cls)
    if cached is not None:
        return cached
    out = []
    for f in dataclasses.fields(cls):
        declared = f.metadata.get("setting")
        if declared is None:
            continue
        annotation = str(f.type).replace(" ", "")
        nullable = annotation.endswith("|None")
        base = annotation.removesuffix("|None")
        kind = declared.kind or _FROM_ANNOTATION.get(base) or (
            TABLE if base.startswith("dict") else LIST if base.startswith("list") else None)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: no setting kind for {f.type!r}")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        out.append(Setting(f.name, declared.key or f.name, kind, _SCOPES[cls.__name__],
                           declared.help, default, nullable, declared.minimum, declared.maximum,
                           declared.choices, declared.cli and kind not in (TABLE, LIST, ANY),
                           declared.doc_default, declared.check, declared.accepts))
    _SCHEMAS[cls] = result = tuple(out)
    return result


_SCHEMAS: dict[type, tuple[Setting, ...]] = {}


def by_key(settings: Iterable[Setting]) -> dict[str, Setting]:
    """``{TOML key: setting}``."""
    return {s.key: s for s in settings}


def unknown_key(key: str, where: str, known: Iterable[str], value: Any = None,
                elsewhere: Mapping[str, str] | None = None) -> ConfigError:
    """The error for a key nobody declared, with a "did you mean" for a near miss."""
    known = sorted(known)
    text = f"{where} unknown key {key!r}"
    if value is not None:
        text += f" (= {_show(value)})"
    if elsewhere and key in elsewhere:
        return ConfigError(f"{text}: it belongs in {elsewhere[key]}")
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if near:
        return ConfigError(f"{text}; did you mean {near[0]!r}?")
    return ConfigError(f"{text}; allowed keys: {', '.join(known)}")


def apply(target: Any, settings: Iterable[Setting], values: Mapping[str, Any], where: str,
          textual: bool = False, elsewhere: Mapping[str, str] | None = None) -> None:
    """Check ``{key: value}`` against ``settings`` and set them on ``target``."""
    known = by_key(settings)
    for key, value in values.items():
        spec = known.get(key)
        if spec is None:
            raise unknown_key(key, where, known, value, elsewhere)
        setattr(target, spec.name, spec.parse(value, where, textual))


def parse_mode(value: Any) -> int:
    """A file mode written the ``chmod`` way: ``"660"``, ``"0660"`` or ``0o660``."""
    if isinstance(value, int) and not isinstance(value, bool):
        # TOML 0o660 arrives as 432, a bare 660 as 660: read the latter's digits as octal.
        # (_config.read_toml hands a bare decimal like 440 over as the string "440", so it is
        # read the chmod way too, not as decimal 440 = 0o670.)
        if value > 0o777 and set(str(value)) <= set("01234567"):
            return int(str(value), 8)
        return value
    if not isinstance(value, str) or not re.fullmatch(r"(0o?)?[0-7]{1,4}", value.strip()):
        raise ValueError(value)
    text = value.strip()
    return int(text[2:] if text.startswith("0o") else text, 8)


def markdown_table(*groups: tuple[str, Iterable[Setting]]) -> str:
    """The settings table of docs/operations.md (``tensorbridge settings --format markdown``)."""
    lines = ["| scope | TOML key | flag / environment | default | allowed | what |",
             "|---|---|---|---|---|---|"]
    for scope, settings in groups:
        for s in settings:
            names = f"`{s.flag}`<br>`{s.env}`" if s.cli else "(file only)"
            allowed = s.allowed().replace("|", "\\|")
            lines.append(f"| {scope} | `{s.key}` | {names} | {s.shown_default()} | {allowed} "
                         f"| {s.help} |")
    return "\n".join(lines) + "\n"


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {_number_text(minimum)} to {_number_text(maximum)}"
    if minimum is not None:
        return f" >= {_number_text(minimum)}"
    if maximum is not None:
        return f" <= {_number_text(maximum)}"
    return ""


def _number_text(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parse_bool(value: Any, textual: bool) -> bool:
    if isinstance(value, bool):
        return value
    if textual and isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
    raise ValueError(value)


def _type_name(value: Any) -> str:
    """A value's type in TOML's words."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"),
                       (str, "a string"), (Mapping, "a table"), (list, "a list")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _show(value: Any) -> str:
    """A value as the message shows it (TOML-like: strings quoted)."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
