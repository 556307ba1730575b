"""Number and label formatting shared by the verdicts and the Markdown and HTML renderers, so the
same value reads the same everywhere: milliseconds with three significant digits, speedups as
``2.31x``, metric fractions as percentages, and a missing value as an em dash.
"""

from __future__ import annotations

from typing import Any

MISSING = "—"
VARIANT_LABELS = {"fp32": "fp32", "default_precision": "default precision", "compiled": "compiled"}


def fmt_ms(value_ms: float | None) -> str:
    """``0.412`` -> ``"0.412"``, ``12.34`` -> ``"12.3"``; a missing value -> an em dash."""
    if value_ms is None:
        return MISSING
    if value_ms >= 100:
        return f"{value_ms:.0f}"
    if value_ms >= 10:
        return f"{value_ms:.1f}"
    if value_ms >= 1:
        return f"{value_ms:.2f}"
    return f"{value_ms:.3f}"


def fmt_speedup(ratio: float | None) -> str:
    """``2.314`` -> ``"2.31x"``."""
    return MISSING if ratio is None else f"{ratio:.2f}x"


def fmt_fraction(value: float | None, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage: ``0.9123`` -> ``"91.23%"``."""
    return MISSING if value is None else f"{value * 100:.{digits}f}%"


def fmt_points(drop_points: float | None) -> str:
    """A drop in percentage points, signed so that a loss reads as a drop: ``0.4`` -> ``"0.40"``."""
    return MISSING if drop_points is None else f"{drop_points:.2f}"


def fmt_float(value: float | None, digits: int = 4) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def fmt_db(value_db: float | None) -> str:
    return MISSING if value_db is None else f"{value_db:.1f} dB"


def engine_label(precision: str | None) -> str:
    """``"int8"`` -> ``"INT8 engine"``; an unknown precision -> ``"compiled engine"``."""
    return f"{precision.upper()} engine" if precision else "compiled engine"


def fmt_value(value: Any) -> str:
    """Any JSON value as one line: lists joined by commas, floats to 4 significant digits."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_value(v) for v in value) if value else MISSING
    return " ".join(str(value).split())


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level: ``{"cpu": {"cores": 2}}`` -> ``{"cpu.cores": 2}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
