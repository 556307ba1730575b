"""Typed, strict access to a parsed TOML document, for the hardware-profile loader.

Each accessor takes the table, the dotted key and what is expected, and raises ``ProfileError``
naming the file, the key, the value found and what was expected; nothing else in the loader
formats an error about a key.
"""

from __future__ import annotations

from typing import Any

from deploycomp.errors import ProfileError, closest_match_hint

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib  # type: ignore[no-redef]


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text; a syntax error becomes a ProfileError naming ``source`` and the line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: not valid TOML: {exc}. Fix the syntax.") from exc


class Reader:
    """Typed, strict access to one parsed TOML document; every failure names file and key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, value: Any, expected: str, hint: str = "") -> ProfileError:
        return ProfileError(
            f"{self.source}: key {key!r} is {value!r}, expected {expected}.{hint} Fix the file "
            f"(the packaged profile nvidia/a100.toml documents every key)."
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
                    f"{self.source}: unknown key {prefix + name!r}; expected one of: "
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

    def number(
        self,
        data: dict[str, Any],
        table: str,
        name: str,
        unit: str,
        *,
        integer: bool = False,
        optional: bool = False,
    ) -> Any:
        if name not in data:
            if optional:
                return None
            raise self.missing(f"{table}.{name}")
        value = data[name]
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            what = "a positive integer" if integer else "a positive number"
            raise self.fail(f"{table}.{name}", value, f"{what} ({unit})")
        return value if integer else float(value)
