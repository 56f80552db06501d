"""How one environment variable is read: its parser with its bounds, its default, and the words
docs/configuration.md shows for them (the table of variables itself is ``consumer.variables``)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as default_of
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

from consumer.errors import ConfigError
from sandbox import PoolConfig

SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")
# The longest time a setting may name: ten years. Far longer than any timeout, grace or
# retention wants, and well inside JetStream's durations (nanoseconds in 64 bits, 292 years),
# where a larger number (1e300) stopped the start with an overflow instead of a message.
MAX_SECONDS = 10 * 365 * 86400


class Parser(Protocol):
    """Turns a variable's text (stripped, never empty) into its value, or raises ConfigError."""

    @property
    def valid(self) -> str:
        """The values it takes, as the docs' summary table says it."""
        ...

    def __call__(self, name: str, text: str) -> Any: ...


def pool_bounds(pool_field: str) -> tuple[int, int]:
    """The bounds ``PoolConfig`` states for one of its whole-number fields."""
    kind = _pool_fields()[pool_field].type
    assert isinstance(kind, msgspec.inspect.IntType), pool_field
    assert kind.ge is not None, f"PoolConfig.{pool_field} has no lower bound"
    assert kind.le is not None, f"PoolConfig.{pool_field} has no upper bound"
    return kind.ge, kind.le


def pool_default(pool_field: str) -> Any:
    return _pool_fields()[pool_field].default


def _pool_fields() -> dict[str, msgspec.inspect.Field]:
    info = msgspec.inspect.type_info(PoolConfig)
    assert isinstance(info, msgspec.inspect.StructType)
    return {item.name: item for item in info.fields}


@dataclass(frozen=True)
class Whole:
    """A whole number between ``low`` and ``high``."""

    low: int
    high: int
    unit: str = ""

    @classmethod
    def of_pool(cls, pool_field: str, unit: str = "") -> Whole:
        """The bounds ``PoolConfig`` states for the field (so they are written once)."""
        low, high = pool_bounds(pool_field)
        return cls(low, high, unit)

    @property
    def valid(self) -> str:
        span = f"{self.low}\N{EN DASH}{self.high}"  # as the docs write ranges
        return f"{span} {self.unit}" if self.unit else span

    def __call__(self, name: str, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, not '{text}'") from None
        if not self.low <= value <= self.high:
            raise ConfigError(f"{name} must be between {self.low} and {self.high}, not {value}")
        return value


@dataclass(frozen=True)
class Seconds:
    """A positive, finite number of seconds; at least ``low`` when one is given (the durations
    JetStream keeps: below a second a consumer would redeliver, or a stream expire, at once)."""

    valid: str = "seconds"
    low: float = 0.0

    def __call__(self, name: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, not '{text}'") from None
        if not 0 < value < float("inf"):
            raise ConfigError(f"{name} must be a positive number of seconds, not '{text}'")
        if value < self.low:
            raise ConfigError(f"{name} must be at least {self.low:g} seconds, not {text}")
        if value > MAX_SECONDS:
            raise ConfigError(
                f"{name} must be at most {MAX_SECONDS} seconds (ten years), not {text}"
            )
        return value


@dataclass(frozen=True)
class Share:
    """A share of a whole: above 0, at most 1."""

    valid: str = "above 0, at most 1"

    def __call__(self, name: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(
                f"{name} must be a number above 0 and at most 1, not '{text}'"
            ) from None
        if not 0 < value <= 1:
            raise ConfigError(f"{name} must be above 0 and at most 1, not {value:g}")
        return value


@dataclass(frozen=True)
class Flag:
    """``1`` or ``0`` (``true``/``yes`` and ``false``/``no`` are taken too)."""

    valid: str = "`1`, `0`"

    def __call__(self, name: str, text: str) -> bool:
        lowered = text.lower()
        if lowered in ("0", "false", "no"):
            return False
        if lowered in ("1", "true", "yes"):
            return True
        raise ConfigError(f"{name} must be 1 or 0")


@dataclass(frozen=True)
class Choice:
    """One of a few words; case does not matter."""

    options: tuple[str, ...]

    @property
    def valid(self) -> str:
        return ", ".join(f"`{option}`" for option in self.options)

    def __call__(self, name: str, text: str) -> str:
        if text.lower() not in self.options:
            raise ConfigError(
                f"{name} must be " + " or ".join(f"'{option}'" for option in self.options)
            )
        return text.lower()


@dataclass(frozen=True)
class Address:
    """An IP address to listen on."""

    valid: str = "an IP address to listen on"

    def __call__(self, name: str, text: str) -> str:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(
                f"{name} must be an IP address such as 0.0.0.0 or 127.0.0.1"
            ) from None
        return text


@dataclass(frozen=True)
class Directory:
    """A path; with ``existing``, one that is a directory now."""

    valid: str
    existing: bool = False

    def __call__(self, name: str, text: str) -> Path:
        path = Path(text)
        if self.existing and not path.is_dir():
            raise ConfigError(f"{name}: '{path}' is not a directory")
        return path


@dataclass(frozen=True)
class Text:
    """Free text, or text a check accepts (``error`` names what it must be)."""

    valid: str
    check: Callable[[str], bool] = default_of(default=lambda _text: True)
    error: str = ""

    def __call__(self, name: str, text: str) -> str:
        if not self.check(text):
            raise ConfigError(f"{name} {self.error.format(text=text)}")
        return text


@dataclass(frozen=True)
class Custom:
    """A rule of one variable's own: ``function`` reads the text."""

    valid: str
    function: Callable[[str, str], Any]

    def __call__(self, name: str, text: str) -> Any:
        return self.function(name, text)


@dataclass(frozen=True)
class Items:
    """A list (comma-separated unless told); ``item`` checks and converts each entry. A list of
    separators only is empty, so it means the default (``None``)."""

    valid: str
    item: Callable[[str, str], Any] | None = None
    separator: str = ","

    def __call__(self, name: str, text: str) -> tuple[Any, ...] | None:
        parts = [part.strip() for part in text.split(self.separator) if part.strip()]
        if not parts:
            return None
        if self.item is not None:
            return tuple(self.item(name, part) for part in parts)
        return tuple(parts)


@dataclass(frozen=True)
class Derived:
    """A default that depends on other variables (or on the host): ``compute`` gets the values
    read so far, by variable name."""

    text: str
    compute: Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True, kw_only=True)
class Variable:
    """One environment variable: where its value goes, how it is read, and its default."""

    name: str
    origin: Literal["contract", "project"]
    parse: Parser
    default: Any = None
    """The value when unset or empty: a value, a :class:`Derived`, or (for a pool field, when
    left ``None``) ``PoolConfig``'s own default."""
    field: str | None = None
    """The ``Settings`` field it sets, ``pool.<name>`` for a ``PoolConfig`` field, or ``None``
    when ``load`` combines it with others (the keys)."""
    default_text: str = ""
    """The docs' words for the default where the value alone would not say it."""
    note: str = ""
    """Added to the valid values in the docs' summary table."""

    @property
    def pool_field(self) -> str | None:
        if self.field is None or not self.field.startswith("pool."):
            return None
        return self.field.removeprefix("pool.")

    def default_value(self, values: Mapping[str, Any]) -> Any:
        if isinstance(self.default, Derived):
            return self.default.compute(values)
        if self.default is None and self.pool_field is not None:
            return pool_default(self.pool_field)
        return self.default

    def read(self, environ: Mapping[str, str], values: Mapping[str, Any]) -> Any:
        text = environ.get(self.name, "").strip()
        value = self.parse(self.name, text) if text else None
        return self.default_value(values) if value is None else value

    @property
    def documented_default(self) -> str:
        if self.default_text:
            return self.default_text
        if isinstance(self.default, Derived):
            return self.default.text
        return _shown(self.default_value({}))

    @property
    def documented_valid(self) -> str:
        return "; ".join(part for part in (self.parse.valid, self.note) if part)


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return f"`{','.join(map(str, value))}`" if value else "empty"
    return f"`{value}`" if value else "empty"


def summary_table(variables: Iterable[Variable]) -> str:
    """The summary table of docs/configuration.md, as Markdown."""
    lines = ["| variable | from | default | valid values |", "| --- | --- | --- | --- |"]
    for variable in variables:
        lines.append(
            f"| `{variable.name}` | {variable.origin} | {variable.documented_default} | "
            f"{variable.documented_valid} |"
        )
    return "\n".join(lines) + "\n"
