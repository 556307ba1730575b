"""Render the report dictionary as one self-contained HTML page: inline CSS, plots embedded as
base64 PNG data URIs, no external script, style sheet or image. Every value from the run directory
is escaped. The page carries what the Markdown report collapses: the full per-layer table, the
environment and the engines' build details.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from deploycomp.report import plots
from deploycomp.report.compression import compression_html
from deploycomp.report.engine_layers import engine_layers_html
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
from deploycomp.report.pruning import pruning_html

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; }
.alert { border: 2px solid #c0392b; background: #fdecea; padding: .8em 1em; font-weight: 600; }
.warning { color: #a4281b; } .good { color: #1e7b34; } .slower { color: #a4281b; font-weight: 700; }
img { max-width: 100%; }
details summary { cursor: pointer; }
"""
LAYER_COLUMNS = (
    "index", "name", "onnx_node", "kind", "weight_shape", "macs", "weight", "activation",
    "sparsity",
    "predicted_fp32_ms", "predicted_ms", "predicted_speedup", "reason",
)  # fmt: skip


def _e(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else fmt_value(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: str = "") -> str:
    """An HTML table; cells are escaped unless given as ``("raw", html)``; ``numeric`` has one
    letter per column, ``r`` for a right-aligned number."""

    def cell(value: Any, index: int) -> str:
        css = ' class="num"' if numeric[index : index + 1] == "r" else ""
        body = value[1] if isinstance(value, tuple) and value[:1] == ("raw",) else _e(value)
        return f"<td{css}>{body}</td>"

    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(cell(v, i) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(uri: str | None, alt: str) -> str:
    return f'<p><img src="{uri}" alt="{_e(alt)}"></p>' if uri else ""


def _stats(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return MISSING
    return f"{fmt_ms(stats['median_ms'])} (p90 {fmt_ms(stats['p90_ms'])}) {stats['precision']}"


def _speedup(ratio: float | None) -> Any:
    if ratio is not None and ratio < 1.0:
        return ("raw", f'<span class="slower">{_e(fmt_speedup(ratio))} slower</span>')
    return fmt_speedup(ratio)


def _latency(report: dict[str, Any]) -> str:
    if not report["latency"]:
        return "<h2>Latency</h2><p>No latency was measured.</p>"
    rows = [
        (
            e["backend"], e["batch_size"], _stats(e["fp32"]), _stats(e["default_precision"]),
            _stats(e["compiled"]), _speedup(e["speedup_vs_fp32"]),
            _speedup(e["speedup_vs_default_precision"]), e["measured_on"],
        )
        for e in report["latency"]
    ]  # fmt: skip
    header = (
        "backend", "batch", "fp32 ms", "default precision ms", "compiled ms", "speedup vs fp32",
        "speedup vs default", "measured on",
    )  # fmt: skip
    return (
        "<h2>Latency</h2><p>Median ms. Speedup = fp32 median / compiled median, measured "
        "interleaved in the same run.</p>"
        + _table(header, rows, "lrrrrrrl")
        + _img(plots.latency_plot(report["latency"]), "latency per backend and batch size")
    )


def _accuracy(report: dict[str, Any]) -> str:
    if not report["accuracy"]:
        return "<h2>Accuracy</h2><p>No accuracy was measured.</p>"
    rows = [
        (
            e["eval_set"], e["backend"], e["metric"] or "(unlabelled)", e["num_samples"],
            fmt_fraction(e["fp32_value"]), fmt_fraction(e["compiled_value"]),
            fmt_points(e["drop_points"]), fmt_fraction(e["top1_agreement"]),
            fmt_float(e["cosine"]), fmt_db(e["sqnr_db"]),
            "yes" if e["finite"] else ("raw", '<span class="slower">NO</span>'),
        )
        for e in report["accuracy"]
    ]  # fmt: skip
    header = (
        "eval set", "backend", "metric", "samples", "fp32", "compiled", "drop (points)",
        "top-1 agreement", "cosine", "SQNR", "finite",
    )  # fmt: skip
    return (
        "<h2>Accuracy</h2>"
        + _table(header, rows, "lllrrrrrrrl")
        + _img(plots.accuracy_plot(report["accuracy"]), "accuracy per eval set")
    )


def _verdicts(report: dict[str, Any]) -> str:
    items = "".join(
        f'<li class="{_e(v["severity"])}">{_e(v["text"])}</li>' for v in report["verdicts"]
    )
    return f"<h2>Verdicts</h2><ul>{items or '<li>Nothing to report.</li>'}</ul>"


def _layers(report: dict[str, Any]) -> str:
    layers = report["layers"]
    if not layers:
        return "<h2>Layers</h2><p>No plan: per-layer decisions are not available.</p>"
    summary = _table(
        ("weight", "activation", "sparsity", "layers"),
        [(c["weight"], c["activation"], c["sparsity"], c["count"]) for c in layers["combinations"]],
        "lllr",
    )
    macs = ""
    if layers["macs_quantized_fraction"] is not None:
        macs = (
            f"<p>Quantized weights cover {_e(fmt_fraction(layers['macs_quantized_fraction'], 1))} "
            f"of {layers['macs_total']:,} MACs (plan batch size {_e(layers['batch_size'])}).</p>"
        )
    rows = [[r.get(c) for c in LAYER_COLUMNS] for r in layers["rows"]]
    full = _table(LAYER_COLUMNS, rows, "rllllrlllrrrl")
    return (
        f"<h2>Layers ({layers['count']})</h2>{summary}{macs}"
        + _img(plots.precision_map_plot(layers["rows"]), "per-layer precision map")
        + f"<details open><summary>All {layers['count']} layers</summary>{full}</details>"
    )


def _compression(report: dict[str, Any]) -> str:
    return compression_html(report.get("compression"), _table)


def _pruning(report: dict[str, Any]) -> str:
    return pruning_html(report.get("pruning"), _table)


def _engine_layers(report: dict[str, Any]) -> str:
    return engine_layers_html(report.get("engine_layers"), _table)


def _key_values(title: str, data: dict[str, Any]) -> str:
    if not data:
        return ""
    return f"<h3>{_e(title)}</h3>" + _table(("key", "value"), list(flatten(data).items()))


def _environment(report: dict[str, Any]) -> str:
    parts = ["<h2>Environment</h2>"]
    target = report["target"]
    if target:
        parts.append(_key_values("Target", {
            k: target[k] for k in ("id", "name", "kind", "vendor", "architecture", "reason")
        } | {"this host": target["host"], "target is this host": target["is_host"]}))  # fmt: skip
    measurement = report["measurement"]
    if measurement:
        parts.append(_key_values("Measurement", {
            "threads": measurement["threads"], "pinned cpus": measurement["pinned_cpus"],
            "machine load": measurement["machine_load"] or {},
        }))  # fmt: skip
        parts.append(_key_values("Machine", measurement["environment"]))
    parts.append(_key_values("Versions", report["versions"]))
    if report["export"]:
        parts.append(_key_values("Export", report["export"]))
    if report["engines"]:
        keys = ("backend", "variant", "precision", "device", "build_seconds", "backend_version",
                "path", "notes")  # fmt: skip
        parts.append(
            "<h3>Engines</h3>" + _table(keys, [[e[k] for k in keys] for e in report["engines"]])
        )
    run = report["run"]
    parts.append(_key_values("Run", {k: v for k, v in run.items() if k != "notes"}))
    if report["notes"]:
        parts.append(
            "<h3>Notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report["notes"]) + "</ul>"
        )
    return "".join(parts)


def _header(report: dict[str, Any]) -> str:
    model = report["model"]["name"] or "unknown model"
    target = report["target"]
    title = f"deploycomp report: {model}" + (f" → {target['name']}" if target else "")
    parts = [f"<h1>{_e(title)}</h1>"]
    if report["model"]["description"]:
        parts.append(f"<p>{_e(report['model']['description'])}</p>")
    cross = report["cross_compilation"]
    if cross:
        unavailable = "".join(
            f"<li>{_e(b)} unavailable here: {_e(r)}</li>"
            for b, r in cross["unavailable_backends"].items()
        )
        parts.append(
            f'<div class="alert">Warning — {_e(cross["text"])}'
            + (f"<ul>{unavailable}</ul>" if unavailable else "")
            + "</div>"
        )
    elif target:
        parts.append(f"<p>Latencies measured on this host, the machine the target describes: "
                     f"{_e(target['host'])}.</p>")
    if report["missing"]:
        parts.append(
            '<ul class="warning">'
            + "".join(f"<li>{_e(m)}</li>" for m in report["missing"])
            + "</ul>"
        )
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    """Render a report dict (from :func:`deploycomp.report.build_report`) as a self-contained page.

    Args:
        report: the report dictionary.

    Returns:
        The HTML document.

    Example:
        >>> page = render_html(build_report("out/fashion_mlp"))
        >>> "data:image/png;base64," in page
        True
    """
    title = f"deploycomp report: {report['model']['name'] or 'unknown model'}"
    body = "".join(
        section(report)
        for section in (_header, _latency, _accuracy, _verdicts, _pruning, _compression, _layers,
                        _engine_layers, _environment)
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
