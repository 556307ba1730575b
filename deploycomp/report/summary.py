"""Turn a run directory into the report dictionary: the machine-readable summary that report.json
holds and that the Markdown and HTML renderers draw from. It pairs each compiled engine's latency
with the fp32 and default-precision engines of the same backend and batch size (a speedup is always
a ratio of medians measured in the same run), pairs accuracy rows per evaluation set, summarises the
per-layer decisions, and states the verdicts as sentences. Numbers are kept unrounded; rounding is
the renderers' job.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from deploycomp.artifacts import (
    AccuracyRow,
    CompressionPlan,
    Engine,
    LatencyRow,
    MeasurementResult,
)
from deploycomp.report.compression import compression_section
from deploycomp.report.engine_layers import engine_layers_section
from deploycomp.report.load import RunArtifacts, load_run
from deploycomp.report.pruning import pruning_section
from deploycomp.report.verdicts import cross_compilation_warning, verdicts

REPORT_SCHEMA_VERSION = 1
VARIANTS = ("fp32", "default_precision", "compiled")


def _stats(row: LatencyRow) -> dict[str, Any]:
    stats = row.stats.to_dict()
    stats.pop("schema_version", None)
    return {"precision": row.precision, "measured_on": row.measured_on, **stats}


def _ratio(numerator_ms: float | None, denominator_ms: float | None) -> float | None:
    if numerator_ms is None or not denominator_ms:
        return None
    return numerator_ms / denominator_ms


def latency_table(measurement: MeasurementResult) -> list[dict[str, Any]]:
    """One entry per (backend, batch size): the three variants' stats and the speedups.

    Args:
        measurement: the measured latency rows.

    Returns:
        Entries sorted by backend then batch size. ``speedup_vs_fp32`` is the fp32 median divided
        by the compiled median (above 1: the compiled engine is faster); ``None`` where either
        engine was not measured.

    Example:
        >>> latency_table(measurement)[0]["speedup_vs_fp32"]
        2.31
    """
    grouped: dict[tuple[str, int], dict[str, LatencyRow]] = collections.defaultdict(dict)
    for row in measurement.latency:
        grouped[(row.backend, row.stats.batch_size)][row.variant] = row
    entries = []
    for (backend, batch_size), rows in sorted(grouped.items()):
        by_variant = {v: _stats(rows[v]) if v in rows else None for v in VARIANTS}
        medians_ms = {v: s["median_ms"] if s else None for v, s in by_variant.items()}
        speedup_fp32 = _ratio(medians_ms["fp32"], medians_ms["compiled"])
        speedup_default = _ratio(medians_ms["default_precision"], medians_ms["compiled"])
        measured_on = sorted({r.measured_on for r in rows.values()})
        entries.append(
            {
                "backend": backend,
                "batch_size": batch_size,
                "measured_on": ", ".join(measured_on),
                **by_variant,
                "speedup_vs_fp32": speedup_fp32,
                "speedup_vs_default_precision": speedup_default,
                "compiled_slower_than_fp32": None if speedup_fp32 is None else speedup_fp32 < 1.0,
            }
        )
    return entries


def fastest_per_batch(measurement: MeasurementResult) -> list[dict[str, Any]]:
    """The engine with the lowest median latency at each batch size, over all backends."""
    best: dict[int, LatencyRow] = {}
    for row in measurement.latency:
        current = best.get(row.stats.batch_size)
        if current is None or row.stats.median_ms < current.stats.median_ms:
            best[row.stats.batch_size] = row
    return [
        {
            "batch_size": batch_size,
            "backend": row.backend,
            "variant": row.variant,
            "precision": row.precision,
            "median_ms": row.stats.median_ms,
            "measured_on": row.measured_on,
        }
        for batch_size, row in sorted(best.items())
    ]


def _fp32_reference(rows: list[AccuracyRow], eval_set: str, backend: str) -> AccuracyRow | None:
    same_set = [r for r in rows if r.eval_set == eval_set and r.variant == "fp32"]
    for row in same_set:
        if row.backend == backend:
            return row
    return same_set[0] if same_set else None


def accuracy_table(measurement: MeasurementResult) -> list[dict[str, Any]]:
    """One entry per (eval set, backend) pairing the compiled engine with the fp32 reference.

    The fp32 reference is the same backend's fp32 engine, else any fp32 row on that eval set
    (named in ``reference_backend``). Metric values are fractions in [0, 1]; ``drop_points`` is
    ``(fp32 - compiled) * 100`` percentage points, positive when the compiled engine is worse.

    Args:
        measurement: the measured accuracy rows.

    Returns:
        Entries in eval-set order of first appearance, then by backend.
    """
    rows = list(measurement.accuracy)
    eval_sets = list(dict.fromkeys(r.eval_set for r in rows))
    entries = []
    for eval_set in eval_sets:
        backends = sorted({r.backend for r in rows if r.eval_set == eval_set})
        for backend in backends:
            by_variant = {
                r.variant: r for r in rows if r.eval_set == eval_set and r.backend == backend
            }
            compiled = by_variant.get("compiled")
            if compiled is None and len(backends) > 1 and set(by_variant) == {"fp32"}:
                continue  # an fp32-only reference backend; shown as the other backends' baseline
            fp32 = _fp32_reference(rows, eval_set, backend)
            default = by_variant.get("default_precision")
            main = compiled or default or fp32
            fp32_value = fp32.value if fp32 else None
            compiled_value = compiled.value if compiled else None
            drop_points = None
            if fp32_value is not None and compiled_value is not None:
                drop_points = (fp32_value - compiled_value) * 100.0
            entries.append(
                {
                    "eval_set": eval_set,
                    "backend": backend,
                    "labelled": bool(main and main.metric),
                    "metric": main.metric if main else "",
                    "num_samples": main.num_samples if main else 0,
                    "reference_backend": fp32.backend if fp32 else None,
                    "fp32_value": fp32_value,
                    "default_precision_value": default.value if default else None,
                    "compiled_value": compiled_value,
                    "compiled_precision": _precision_of(measurement, backend, "compiled"),
                    "drop_points": drop_points,
                    "top1_agreement": compiled.top1_agreement if compiled else None,
                    "cosine": compiled.cosine if compiled else None,
                    "sqnr_db": compiled.sqnr_db if compiled else None,
                    "finite": all(r.finite for r in by_variant.values()),
                    "non_finite_variants": sorted(v for v, r in by_variant.items() if not r.finite),
                }
            )
    return entries


def _precision_of(measurement: MeasurementResult, backend: str, variant: str) -> str | None:
    for row in measurement.latency:
        if row.backend == backend and row.variant == variant:
            return row.precision
    return None


def layer_summary(plan: CompressionPlan) -> dict[str, Any]:
    """Counts of schemes over the plan's layers, the share of MACs with quantized weights, and the
    full per-layer rows."""
    layers = plan.layers
    combos = collections.Counter(
        (layer.weight, layer.activation, layer.sparsity) for layer in layers
    )
    macs_total = sum(layer.macs for layer in layers)
    macs_quantized = sum(layer.macs for layer in layers if layer.weight != "fp32")
    rows = []
    for index, layer in enumerate(layers):
        row = layer.to_dict()
        row.pop("schema_version", None)
        row["weight_shape"] = list(layer.weight_shape)
        row["predicted_speedup"] = _ratio(layer.predicted_fp32_ms, layer.predicted_ms)
        rows.append({"index": index, **row})
    return {
        "count": len(layers),
        "batch_size": plan.batch_size,
        "weight": dict(collections.Counter(layer.weight for layer in layers).most_common()),
        "activation": dict(collections.Counter(layer.activation for layer in layers).most_common()),
        "sparsity": dict(collections.Counter(layer.sparsity for layer in layers).most_common()),
        "combinations": [
            {"weight": w, "activation": a, "sparsity": s, "count": n}
            for (w, a, s), n in combos.most_common()
        ],
        "macs_total": macs_total,
        "macs_quantized_fraction": macs_quantized / macs_total if macs_total else None,
        "rows": rows,
    }


def _engine_entry(engine: Engine) -> dict[str, Any]:
    return {
        "backend": engine.backend,
        "variant": engine.variant,
        "precision": engine.precision,
        "device": engine.device,
        "path": engine.path,
        "build_seconds": engine.build_seconds,
        "backend_version": engine.backend_version,
        "build_config": engine.build_config,
        "notes": list(engine.notes),
    }


def _versions(artifacts: RunArtifacts) -> dict[str, str]:
    versions: dict[str, str] = {}
    if artifacts.run and artifacts.run.get("deploycomp_version"):
        versions["deploycomp"] = str(artifacts.run["deploycomp_version"])
    elif artifacts.plan:
        versions["deploycomp"] = artifacts.plan.deploycomp_version
    if artifacts.exported:
        versions.update({k: str(v) for k, v in artifacts.exported.versions.items()})
    env_versions = (
        artifacts.measurement.environment.get("versions") if artifacts.measurement else None
    )
    if isinstance(env_versions, dict):
        versions.update(
            {k: "not installed" if v is None else str(v) for k, v in env_versions.items()}
        )
    for engine in artifacts.engines:
        if engine.backend_version:
            versions.setdefault(engine.backend, engine.backend_version)
    return versions


def _target_section(target: dict[str, Any] | None) -> dict[str, Any] | None:
    if target is None:
        return None
    hw_profile = target.get("profile") or {}
    return {
        "id": hw_profile.get("id"),
        "name": hw_profile.get("name") or hw_profile.get("id"),
        "kind": hw_profile.get("kind"),
        "vendor": hw_profile.get("vendor"),
        "architecture": hw_profile.get("architecture"),
        "reason": target.get("reason", ""),
        "is_host": bool(target.get("is_host", False)),
        "host": target.get("host", ""),
        "unavailable_backends": dict(target.get("unavailable_backends") or {}),
        "plan_backend": target.get("plan_backend"),
        "hw_profile": hw_profile,
    }


def _measurement_section(measurement: MeasurementResult | None) -> dict[str, Any] | None:
    if measurement is None:
        return None
    load = measurement.machine_load
    machine_load = None
    if load is not None:
        machine_load = load.to_dict()
        machine_load.pop("schema_version", None)
    environment = {k: v for k, v in measurement.environment.items() if k != "versions"}
    return {
        "threads": measurement.threads,
        "pinned_cpus": list(measurement.pinned_cpus),
        "machine_load": machine_load,
        "environment": environment,
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a CI gate or a dashboard reads: best and sub-1 speedups, worst accuracy."""
    speedups = [
        {"backend": e["backend"], "batch_size": e["batch_size"], "speedup": e["speedup_vs_fp32"]}
        for e in report["latency"]
        if e["speedup_vs_fp32"] is not None
    ]
    drops = [e["drop_points"] for e in report["accuracy"] if e["drop_points"] is not None]
    agreements = [
        e["top1_agreement"] for e in report["accuracy"] if e["top1_agreement"] is not None
    ]
    target = report["target"]
    return {
        "target": target["id"] if target else None,
        "cross_compiled": None if target is None else not target["is_host"],
        "best_speedup_vs_fp32": max(speedups, key=lambda s: s["speedup"]) if speedups else None,
        "slower_than_fp32": [s for s in speedups if s["speedup"] < 1.0],
        "max_accuracy_drop_points": max(drops) if drops else None,
        "min_top1_agreement": min(agreements) if agreements else None,
        "all_finite": all(e["finite"] for e in report["accuracy"]) if report["accuracy"] else None,
        "warnings": sum(v["severity"] == "warning" for v in report["verdicts"]),
    }


def summarize(artifacts: RunArtifacts) -> dict[str, Any]:
    """Compute the report dictionary from loaded artifacts (see :func:`build_report`)."""
    run = artifacts.run or {}
    measurement = artifacts.measurement
    exported = artifacts.exported
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "model": {
            "name": run.get("model") or (artifacts.plan.model_name if artifacts.plan else None),
            "description": run.get("model_description", ""),
        },
        "run": run,
        "target": _target_section(artifacts.target),
        "latency": latency_table(measurement) if measurement else [],
        "fastest": fastest_per_batch(measurement) if measurement else [],
        "accuracy": accuracy_table(measurement) if measurement else [],
        "layers": layer_summary(artifacts.plan) if artifacts.plan else None,
        "export": (
            {
                "opset": exported.opset,
                "quantized_nodes": exported.quantized_nodes,
                "checks": dict(exported.checks),
            }
            if exported
            else None
        ),
        "engines": [_engine_entry(e) for e in artifacts.engines],
        "measurement": _measurement_section(measurement),
        "versions": _versions(artifacts),
        "missing": list(artifacts.missing),
        "notes": list(run.get("notes") or []),
    }
    report["compression"] = compression_section(
        artifacts.compression, artifacts.plan, report["latency"],
        (artifacts.target or {}).get("plan_backend"),
    )
    report["engine_layers"] = engine_layers_section(artifacts.engine_layers)
    report["pruning"] = pruning_section(artifacts.pruning, report["latency"], artifacts.engine_bytes)
    report["cross_compilation"] = cross_compilation_warning(report)
    report["verdicts"] = verdicts(report)
    report["summary"] = headline(report)
    return report


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """Load a run directory's artifacts and compute the report summary.

    Args:
        run_dir: the directory the pipeline wrote (plan.json, measurement.json, engines/, ...).

    Returns:
        A JSON-serialisable dict: ``summary`` (headline numbers: best speedup, engines slower
        than fp32, worst accuracy drop, finiteness, number of warnings), ``latency`` (per backend
        and batch size: fp32, default-precision and compiled stats, ``speedup_vs_fp32``,
        ``speedup_vs_default_precision``), ``fastest``,
        ``accuracy`` (per eval set and backend: values, ``drop_points``, agreement, cosine, SQNR,
        finiteness), ``layers``, ``target``, ``cross_compilation``, ``verdicts`` (sentences),
        ``measurement`` (machine load, threads, environment), ``versions`` and ``missing``.

    Raises:
        OutputDirError: ``run_dir`` is not a directory or holds a malformed artifact.

    Example:
        >>> report = build_report("out/fashion_mlp")
        >>> [v["text"] for v in report["verdicts"] if v["kind"] == "slower_than_fp32"]
        ['on onnxruntime at batch 64 the INT8 engine is 0.68x the speed of fp32: slower; ...']
    """
    return summarize(load_run(run_dir))
