"""Typed, strict access to a parsed TOML document, for the hardware-profile loader.

Each accessor takes the table, the dotted key and what is expected, and raises ``ProfileError``
naming the file, the key, the value found and what was expected; nothing else in the loader
formats an error about a key. Numbers are checked against ``Bounds``: finite, of the right type
and within a plausible range, so that a unit slip or a typo fails at load time instead of
reaching the cost model (or a report) as NaN or 1e300.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from deploycomp.errors import ProfileError, closest_match_hint

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib  # type: ignore[no-redef]

_MAX_SHOWN = 60  # characters of a value's repr quoted in a message


def display_source(source: str) -> str:
    """``source`` as a message shows it: as is, or quoted if it holds a line break or the like."""
    return source if source.isprintable() else repr(source)


def parse_toml(data: bytes, source: str) -> dict[str, Any]:
    """Decode UTF-8 and parse TOML; a bad byte or syntax error becomes a one-line ProfileError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ProfileError(
            f"{source}: not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} "
            f"(offset {exc.start}) is not valid UTF-8. Save the file as UTF-8 (TOML files are "
            f"UTF-8 by definition)."
        ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        reason = " ".join(str(exc).split())
        raise ProfileError(f"{source}: not valid TOML: {reason}. Fix the syntax.") from exc
    except RecursionError as exc:
        raise ProfileError(
            f"{source}: not valid TOML for a hardware profile: arrays or inline tables are "
            f"nested too deeply to parse. Fix the syntax."
        ) from exc


def _show(value: Any) -> str:
    """``repr(value)`` on one line, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else f"{text[: _MAX_SHOWN - 3]}..."


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The plausible values of one number key: ``low <= value <= high``, in ``unit``.

    ``integer`` keys take TOML integers only; other keys take integers or finite floats. A bool
    is never a number here, although Python counts it as one.
    """

    low: float
    high: float
    unit: str
    integer: bool = False

    def admits(self, value: Any) -> bool:
        """Whether ``value`` is of the right type, finite and within the bounds."""
        kinds: tuple[type, ...] = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return self.low <= value <= self.high  # exact for ints of any size

    def describe(self) -> str:
        """E.g. ``'a positive finite number from 0.1 to 100000 (GB/s)'``."""
        noun = "integer" if self.integer else "finite number"
        article = "a positive" if self.low > 0 else "an" if self.integer else "a"
        low, high = _number_text(self.low), _number_text(self.high)
        return f"{article} {noun} from {low} to {high} ({self.unit})"


class Reader:
    """Typed, strict access to one parsed TOML document; every failure names file and key."""

    def __init__(self, source: str) -> None:
        self.source = display_source(source)

    def fail(self, key: str, value: Any, expected: str, hint: str = "") -> ProfileError:
        return ProfileError(
            f"{self.source}: key {key!r} is {_show(value)}, expected {expected}.{hint} Fix the "
            f"file (the packaged profile nvidia/a100.toml documents every key)."
        )

    def missing(self, key: str) -> ProfileError:
        return ProfileError(f"{self.source}: missing required key {key!r}. Add it to the file.")

    def table(self, data: Any, key: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(key, data, "a table")
        prefix = f"{key}." if key else ""
        for name in data:
            if name not in allowed:
                raise ProfileError(
                    f"{self.source}: unknown key {_show(prefix + name)}; expected one of: "
                    f"{', '.join(sorted(allowed))}.{closest_match_hint(name, allowed)} "
                    f"Rename or remove it."
                )
        for name in sorted(required):
            if name not in data:
                raise self.missing(prefix + name)
        return data

    def string(
        self, data: dict[str, Any], table: str, name: str, default: str | None = None
    ) -> str:
        if name not in data:
            if default is None:
                raise self.missing(f"{table}.{name}")
            return default
        value = data[name]
        if not isinstance(value, str) or (default is None and not value):
            raise self.fail(f"{table}.{name}", value, "a non-empty string")
        return value

    def choice(self, key: str, value: Any, known: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in known:
            hint = closest_match_hint(value, known) if isinstance(value, str) else ""
            raise self.fail(key, value, f"one of: {', '.join(known)}", hint)
        return value

    def choices(
        self,
        data: dict[str, Any],
        table: str,
        name: str,
        known: tuple[str, ...],
        default: tuple[str, ...] | None = None,
    ) -> tuple[str, ...]:
        key = f"{table}.{name}"
        if name not in data:
            if default is None:
                raise self.missing(key)
            return default
        values = data[name]
        if not isinstance(values, list):
            raise self.fail(key, values, f"a list of names from: {', '.join(known)}")
        names = tuple(self.choice(f"{key}[{i}]", v, known) for i, v in enumerate(values))
        if len(set(names)) != len(names):
            raise self.fail(key, values, "a list without repeated names")
        return names

    def check(self, key: str, value: Any, bounds: Bounds) -> Any:
        """``value`` as an int (integer bounds) or float, if ``bounds`` admits it."""
        if not bounds.admits(value):
            raise self.fail(key, value, bounds.describe())
        return value if bounds.integer else float(value)

    def number(
        self, data: dict[str, Any], table: str, name: str, bounds: Bounds, optional: bool = False
    ) -> Any:
        """The number at ``table.name``, checked; None if absent and ``optional``."""
        if name not in data:
            if optional:
                return None
            raise self.missing(f"{table}.{name}")
        return self.check(f"{table}.{name}", data[name], bounds)
