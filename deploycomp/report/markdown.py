"""Render the report dictionary as compact Markdown for a terminal or a pull request: the
cross-compilation warning (if any) and the latency and accuracy tables first, then the verdicts,
then the per-layer decisions (collapsed to a count summary and the most telling rows past
``MAX_LAYER_ROWS`` layers; the full table lives in report.json and report.html), then what GPU
engines report they run per layer (``layers.json``), then the environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deploycomp.report.compression import compression_lines
from deploycomp.report.engine_layers import engine_layers_lines
from deploycomp.report.formatting import (
    MISSING,
    flatten,
    fmt_db,
    fmt_float,
    fmt_fraction,
    fmt_ms,
    fmt_points,
    fmt_speedup,
    fmt_value,
)
from deploycomp.report.pruning import pruning_lines

MAX_LAYER_ROWS = 30
COLLAPSED_LAYER_ROWS = 12
LAYER_COLUMNS = (
    "name", "kind", "weight", "activation", "sparsity", "predicted_speedup", "reason",
)  # fmt: skip


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else fmt_value(value)
    return " ".join(text.split()).replace("|", "\\|") or MISSING


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    """A Markdown table; ``align`` has one letter per column, ``r`` for right-aligned."""
    align = align.ljust(len(header), "l")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _stats_cell(stats: dict[str, Any] | None, with_precision: bool = False) -> str:
    if stats is None:
        return MISSING
    text = f"{fmt_ms(stats['median_ms'])} ({fmt_ms(stats['p90_ms'])})"
    return f"{text} {stats['precision']}" if with_precision else text


def _speedup_cell(ratio: float | None) -> str:
    if ratio is None:
        return MISSING
    return f"**{fmt_speedup(ratio)} slower**" if ratio < 1.0 else fmt_speedup(ratio)


def latency_lines(report: dict[str, Any]) -> list[str]:
    entries = report["latency"]
    if not entries:
        return ["## Latency", "", "No latency was measured."]
    rows = [
        (
            e["backend"], e["batch_size"], _stats_cell(e["fp32"]),
            _stats_cell(e["default_precision"], True), _stats_cell(e["compiled"], True),
            _speedup_cell(e["speedup_vs_fp32"]), _speedup_cell(e["speedup_vs_default_precision"]),
            e["measured_on"],
        )
        for e in entries
    ]  # fmt: skip
    header = (
        "backend", "batch", "fp32 ms", "default precision ms", "compiled ms",
        "speedup vs fp32", "vs default", "measured on",
    )  # fmt: skip
    return [
        "## Latency",
        "",
        "Median ms (p90 in parentheses). Speedup = fp32 median / compiled median, same run.",
        "",
        *table(header, rows, "lrrrrrrl"),
    ]


def accuracy_lines(report: dict[str, Any]) -> list[str]:
    entries = report["accuracy"]
    if not entries:
        return ["## Accuracy", "", "No accuracy was measured."]
    rows = [
        (
            e["eval_set"], e["backend"], e["metric"] or "(unlabelled)", e["num_samples"],
            fmt_fraction(e["fp32_value"]), fmt_fraction(e["compiled_value"]),
            fmt_points(e["drop_points"]), fmt_fraction(e["top1_agreement"]),
            fmt_float(e["cosine"]), fmt_db(e["sqnr_db"]),
            "yes" if e["finite"] else "**NO**",
        )
        for e in entries
    ]  # fmt: skip
    header = (
        "eval set", "backend", "metric", "samples", "fp32", "compiled", "drop (points)",
        "top-1 agreement", "cosine", "SQNR", "finite",
    )  # fmt: skip
    return ["## Accuracy", "", *table(header, rows, "lllrrrrrrrl")]


def _marker(severity: str) -> str:
    return {"warning": "**Warning:** ", "good": ""}.get(severity, "")


def verdict_lines(report: dict[str, Any]) -> list[str]:
    lines = ["## Verdicts", ""]
    lines += [f"- {_marker(v['severity'])}{v['text']}" for v in report["verdicts"]]
    return lines if report["verdicts"] else [*lines, "Nothing to report."]


def _scheme_summary(layers: dict[str, Any]) -> list[str]:
    def counts(section: str) -> str:
        return ", ".join(f"{n} {name}" for name, n in layers[section].items())

    lines = [
        (
            f"{layers['count']} layers. Weights: {counts('weight')}. "
            f"Activations: {counts('activation')}. Sparsity: {counts('sparsity')}."
        ),
    ]
    if layers["macs_quantized_fraction"] is not None:
        lines[0] += (
            f" Quantized weights cover {fmt_fraction(layers['macs_quantized_fraction'], 1)} "
            f"of {layers['macs_total']:,} MACs."
        )
    return lines


def select_layer_rows(layers: dict[str, Any], limit: int = COLLAPSED_LAYER_ROWS) -> list[dict]:
    """The rows to show when the table is collapsed: layers whose scheme differs from the most
    common one (the exceptions carry the interesting reasons), then the first layers, in order."""
    rows = layers["rows"]
    if len(rows) <= limit:
        return rows
    usual = layers["combinations"][0] if layers["combinations"] else None

    def is_usual(row: dict[str, Any]) -> bool:
        return usual is not None and all(
            row[k] == usual[k] for k in ("weight", "activation", "sparsity")
        )

    picked = [r["index"] for r in rows if not is_usual(r)][:limit]
    for row in rows:
        if len(picked) >= limit:
            break
        if row["index"] not in picked:
            picked.append(row["index"])
    return [rows[i] for i in sorted(picked)]


def layer_lines(report: dict[str, Any]) -> list[str]:
    layers = report["layers"]
    if not layers:
        return ["## Layers", "", "No plan: per-layer decisions are not available."]
    lines = ["## Layers", "", *_scheme_summary(layers), ""]
    rows = layers["rows"]
    shown = rows if len(rows) <= MAX_LAYER_ROWS else select_layer_rows(layers)
    if len(shown) < len(rows):
        lines += [
            (
                f"Showing {len(shown)} of {len(rows)} layers (those whose scheme differs from the "
                "usual one, then the first); the full table is in report.json and report.html."
            ),
            "",
        ]
    lines += table(LAYER_COLUMNS, [[r[c] for c in LAYER_COLUMNS] for r in shown])
    return lines


def environment_lines(report: dict[str, Any]) -> list[str]:
    lines = ["## Environment", ""]
    target = report["target"]
    if target:
        lines.append(
            f"- target: {target['name']} ({target['id']}; {target['kind']}, "
            f"{target['architecture']}): {target['reason']}"
        )
        lines.append(f"- this host: {target['host'] or MISSING}; target is this host: "
                     f"{'yes' if target['is_host'] else 'no'}")  # fmt: skip
    measurement = report["measurement"]
    if measurement:
        pinned = fmt_value(measurement["pinned_cpus"])
        lines.append(f"- threads: {measurement['threads']}; pinned cpus: {pinned}")
        load = measurement["machine_load"]
        if load:
            lines.append(
                f"- machine load: other processes {fmt_fraction(load['other_cpu_fraction'], 1)} "
                f"of the CPU, loadavg 1m {load['loadavg_1m']:.2f}, attempts {load['attempts']}, "
                f"idle {'yes' if load['idle'] else 'no'}"
            )
        for key, value in flatten(measurement["environment"]).items():
            lines.append(f"- {key}: {fmt_value(value)}")
    if report["versions"]:
        versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        lines.append(f"- versions: {versions}")
    export = report["export"]
    if export:
        checks = ", ".join(f"{k} {fmt_value(v)}" for k, v in export["checks"].items())
        lines.append(f"- export: opset {export['opset']}, {export['quantized_nodes']} quantized "
                     f"nodes; checks vs torch: {checks or MISSING}")  # fmt: skip
    for engine in report["engines"]:
        lines.append(
            f"- engine {engine['backend']}-{engine['variant']}: {engine['precision']} on "
            f"{engine['device']}, built in {engine['build_seconds']:.1f} s"
            + (f" ({'; '.join(engine['notes'])})" if engine["notes"] else "")
        )
    run = report["run"]
    if run.get("stage_seconds"):
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in run["stage_seconds"].items())
        lines.append(f"- stages: {stages}")
    if run.get("command"):
        lines.append(f"- command: `{run['command']}`")
    lines += [f"- note: {note}" for note in report["notes"]]
    return lines


def _compression(report: dict[str, Any]) -> list[str]:
    return compression_lines(report.get("compression"), table)


def _pruning(report: dict[str, Any]) -> list[str]:
    return pruning_lines(report.get("pruning"), table)


def _engine_layers(report: dict[str, Any]) -> list[str]:
    return engine_layers_lines(report.get("engine_layers"), table)


def _title(report: dict[str, Any]) -> str:
    model = report["model"]["name"] or "unknown model"
    target = report["target"]
    return (
        f"# deploycomp report: {model} → {target['name']}"
        if target
        else f"# deploycomp report: {model}"
    )


def render_markdown(report: dict[str, Any]) -> str:
    """Render a report dict (from :func:`deploycomp.report.build_report`) as Markdown.

    Args:
        report: the report dictionary.

    Returns:
        The Markdown text, ending in a newline.

    Example:
        >>> print(render_markdown(build_report("out/fashion_mlp")))
    """
    lines = [_title(report), ""]
    if report["model"]["description"]:
        lines += [report["model"]["description"], ""]
    cross = report["cross_compilation"]
    if cross:
        lines.append(f"> **Warning — {cross['text']}**")
        for backend, reason in cross["unavailable_backends"].items():
            lines.append(f"> - {backend} unavailable here: {reason}")
        lines.append("")
    elif report["target"]:
        host = report["target"]["host"]
        lines += [f"Latencies measured on this host, the machine the target describes: {host}.", ""]
    for section in (latency_lines, accuracy_lines, verdict_lines, _pruning, _compression, layer_lines,
                    _engine_layers, environment_lines):
        lines += [*section(report), ""]
    return "\n".join(lines).rstrip() + "\n"
