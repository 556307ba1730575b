"""Plain-sentence verdicts drawn from the report dictionary: where latencies were measured (and the
cross-compilation warning when that is not the target), where the compiled engine is slower than
fp32 or the default-precision engine, which engine is fastest, non-finite outputs, accuracy drops
and a busy machine. Each verdict is ``{"kind", "severity", "text"}``; severity is ``warning``,
``info`` or ``good``, so renderers can order and colour them without parsing the text.
"""

from __future__ import annotations

from typing import Any

from deploycomp.report.formatting import (
    engine_label,
    fmt_db,
    fmt_float,
    fmt_fraction,
    fmt_ms,
    fmt_points,
    fmt_speedup,
)

# A drop larger than this (percentage points of the task metric) is flagged as a warning.
ACCURACY_DROP_WARNING_POINTS = 1.0
# Below this top-1 agreement with fp32 an unlabelled set is flagged as a warning.
AGREEMENT_WARNING = 0.97
# Another process using more than this share of the CPU makes latencies suspect.
BUSY_CPU_FRACTION = 0.05


def _verdict(kind: str, severity: str, text: str) -> dict[str, str]:
    return {"kind": kind, "severity": severity, "text": text}


def cross_compilation_warning(report: dict[str, Any]) -> dict[str, Any] | None:
    """The warning shown at the top when latencies were not measured on the target.

    Args:
        report: the report dict with ``target`` and ``latency`` filled in.

    Returns:
        ``None`` when the target is this host; otherwise ``{"text", "target", "measured_on",
        "unavailable_backends"}``. Also returned (saying the target is unknown) when target.json
        is missing but latencies exist.
    """
    target = report.get("target")
    measured_on = sorted({e["measured_on"] for e in report.get("latency", []) if e["measured_on"]})
    if target is not None and target["is_host"]:
        return None
    if target is None:
        if not measured_on:
            return None
        return {
            "text": (
                "target.json is missing, so it is unknown whether the latencies below were "
                f"measured on the target; they were measured on {', '.join(measured_on)}."
            ),
            "target": None,
            "measured_on": measured_on,
            "unavailable_backends": {},
        }
    host = target["host"] or ", ".join(measured_on) or "this host"
    target_name = f"{target['name']} ({target['id']})" if target["id"] else str(target["name"])
    text = (
        f"Cross-compilation: latencies were measured on this host ({host}), NOT on the target "
        f"{target_name}. They show how the engines behave here, not on the target; measure on "
        "the target before relying on them."
    )
    return {
        "text": text,
        "target": target_name,
        "measured_on": measured_on or [host],
        "unavailable_backends": dict(target["unavailable_backends"]),
    }


def _latency_verdicts(entry: dict[str, Any]) -> list[dict[str, str]]:
    where = f"on {entry['backend']} at batch {entry['batch_size']}"
    compiled = entry["compiled"]
    if compiled is None or entry["fp32"] is None:
        missing = "compiled" if compiled is None else "fp32"
        return [_verdict(
            "no_speedup", "info",
            f"{where} no {missing} engine was measured, so there is no speedup vs fp32.",
        )]  # fmt: skip
    label = engine_label(compiled["precision"])
    default = entry["default_precision"]
    out = []
    speedup = entry["speedup_vs_fp32"]
    if speedup is not None:
        if speedup < 1.0:
            fallback = "the fp32 engine"
            if default and entry["fp32"] and default["median_ms"] < entry["fp32"]["median_ms"]:
                fallback = f"the default-precision ({default['precision']}) engine"
            out.append(_verdict(
                "slower_than_fp32", "warning",
                f"{where} the {label} is {fmt_speedup(speedup)} the speed of fp32: slower; "
                f"use {fallback} there.",
            ))  # fmt: skip
        else:
            out.append(_verdict(
                "faster_than_fp32", "good",
                f"{where} the {label} is {fmt_speedup(speedup)} the speed of fp32 "
                f"({fmt_ms(compiled['median_ms'])} ms vs {fmt_ms(entry['fp32']['median_ms'])} ms "
                "median): faster.",
            ))  # fmt: skip
    vs_default = entry["speedup_vs_default_precision"]
    if vs_default is not None and vs_default < 1.0 and default["precision"] != "fp32":
        out.append(_verdict(
            "slower_than_default_precision", "warning",
            f"{where} the {label} is {fmt_speedup(vs_default)} the speed of the backend's "
            f"default-precision ({default['precision']}) engine: slower; the backend does better "
            "on the fp32 model left alone.",
        ))  # fmt: skip
    return out


def _fastest_verdicts(report: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for best in report.get("fastest", []):
        variant = best["variant"].replace("_", "-")
        out.append(_verdict(
            "fastest", "info",
            f"fastest at batch {best['batch_size']}: {best['backend']} {variant} engine "
            f"({best['precision']}), {fmt_ms(best['median_ms'])} ms median on "
            f"{best['measured_on']}.",
        ))  # fmt: skip
    return out


def _accuracy_verdicts(entry: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    where = f"on {entry['eval_set']} ({entry['num_samples']} samples)"
    if not entry["finite"]:
        variants = ", ".join(entry["non_finite_variants"])
        out.append(_verdict(
            "non_finite", "warning",
            f"{where} the {entry['backend']} {variants} engine produced non-finite outputs "
            "(NaN or Inf): its accuracy numbers are not meaningful.",
        ))  # fmt: skip
    label = engine_label(entry["compiled_precision"])
    if entry["drop_points"] is not None:
        drop = entry["drop_points"]
        change = f"a drop of {fmt_points(drop)} points" if drop >= 0 else (
            f"a gain of {fmt_points(-drop)} points")  # fmt: skip
        severity = "warning" if drop > ACCURACY_DROP_WARNING_POINTS else "info"
        out.append(_verdict(
            "accuracy_drop", severity,
            f"{where} {entry['metric']} is {fmt_fraction(entry['compiled_value'])} for the "
            f"{entry['backend']} {label} vs {fmt_fraction(entry['fp32_value'])} for fp32: "
            f"{change}.",
        ))  # fmt: skip
    elif entry["top1_agreement"] is not None:
        agreement = entry["top1_agreement"]
        severity = "warning" if agreement < AGREEMENT_WARNING else "info"
        out.append(_verdict(
            "agreement", severity,
            f"{where}, unlabelled: the {entry['backend']} {label} agrees with fp32 on top-1 for "
            f"{fmt_fraction(agreement)} of samples (cosine {fmt_float(entry['cosine'])}, "
            f"SQNR {fmt_db(entry['sqnr_db'])}).",
        ))  # fmt: skip
    return out


def _machine_verdicts(report: dict[str, Any]) -> list[dict[str, str]]:
    measurement = report.get("measurement") or {}
    load = measurement.get("machine_load")
    if not load:
        return []
    busy = load["other_cpu_fraction"]
    if not load["idle"] or busy > BUSY_CPU_FRACTION:
        return [_verdict(
            "machine_busy", "warning",
            f"the machine was not idle while latency was measured: other processes used "
            f"{fmt_fraction(busy, 0)} of the CPU (after {load['attempts']} attempts); latencies "
            "may be inflated and speedups noisy.",
        )]  # fmt: skip
    return []


def verdicts(report: dict[str, Any]) -> list[dict[str, str]]:
    """All verdicts for a report dict: warnings first, then the rest, each group in table order.

    Args:
        report: the report dict with every section but ``verdicts`` filled in.

    Returns:
        A list of ``{"kind", "severity", "text"}``.

    Example:
        >>> verdicts(report)[0]["text"]
        'Cross-compilation: latencies were measured on this host (...), NOT on the target ...'
    """
    found: list[dict[str, str]] = []
    cross = report.get("cross_compilation")
    if cross:
        found.append(_verdict("cross_compiled", "warning", cross["text"]))
        for backend, reason in cross["unavailable_backends"].items():
            found.append(_verdict(
                "unavailable_backend", "warning",
                f"{backend} (a backend of the target) is unavailable here: {reason}",
            ))  # fmt: skip
    for note in report.get("missing", []):
        found.append(_verdict("missing_artifact", "warning", note))
    for entry in report.get("latency", []):
        found.extend(_latency_verdicts(entry))
    found.extend(_fastest_verdicts(report))
    for entry in report.get("accuracy", []):
        found.extend(_accuracy_verdicts(entry))
    found.extend(_machine_verdicts(report))
    return sorted(found, key=lambda v: v["severity"] != "warning")
