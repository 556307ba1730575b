"""The report's engine-layers section: per layer of a built GPU engine, the precision it computes
in and whether a 2:4 sparse kernel runs, from the engine directory's ``layers.json``.

Backends that choose kernels per layer (tensorrt from its engine inspector, torch from its own
kernel choice) write ``layers.json`` with :func:`write_engine_layers`; :func:`read_engine_layers`
reads it back, and the section is omitted for engines without one. The section's point is the
layers whose 2:4 weights still ran a dense kernel: planning for sparsity pays only where the engine
picks a sparse kernel.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deploycomp.artifacts import EngineLayer, write_json_atomic
from deploycomp.errors import OutputDirError

LAYERS_FILE = "layers.json"
LAYERS_SCHEMA_VERSION = 1
MAX_MARKDOWN_ROWS = 30  # per engine; report.html and report.json hold every layer
COLUMNS = ("layer", "op", "precision", "2:4 weights", "sparse kernel", "note")


def write_engine_layers(
    engine_dir: str | Path, backend: str, layers: Sequence[EngineLayer]
) -> Path:
    """Write ``layers.json`` into an engine directory.

    Example:
        >>> write_engine_layers(out_dir, "tensorrt", [EngineLayer("fc", "gemm", "int8", True, True)])
    """
    return write_json_atomic(Path(engine_dir) / LAYERS_FILE, {
        "schema_version": LAYERS_SCHEMA_VERSION,
        "backend": backend,
        "layers": [layer.to_dict() for layer in layers],
    })  # fmt: skip


def read_engine_layers(engine_dir: str | Path) -> list[EngineLayer] | None:
    """The layers in an engine directory's ``layers.json``; None when it has none.

    Raises:
        OutputDirError: the file is not a ``layers.json`` that :func:`write_engine_layers` wrote.

    Example:
        >>> [layer.name for layer in read_engine_layers("out/run/engines/tensorrt-compiled")]
        ['/features/features.0/Conv + /features/features.2/Relu', ...]
    """
    path = Path(engine_dir) / LAYERS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("schema_version") != LAYERS_SCHEMA_VERSION:
            raise ValueError(f"schema_version {data.get('schema_version')!r}")
        return [EngineLayer.from_dict(layer) for layer in data["layers"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise OutputDirError(
            f"{str(path)!r} is not a layers.json of schema version {LAYERS_SCHEMA_VERSION} "
            f"({type(exc).__name__}: {exc}); rebuild the engine with this deploycomp version."
        ) from exc


def engine_layers_section(
    layers_by_engine: Mapping[str, Sequence[EngineLayer]],
) -> list[dict[str, Any]] | None:
    """Per engine directory name: its layers as rows and the sparse-kernel counts.

    Returns:
        None without any ``layers.json``; else one entry per engine with ``engine``, ``layers``
        (dict rows), ``sparse_kernels``, ``sparse_weights`` and ``dense_2_4`` (layers whose 2:4
        weights ran a dense kernel).
    """
    if not layers_by_engine:
        return None
    entries = []
    for engine, layers in sorted(layers_by_engine.items()):
        rows = [{k: v for k, v in layer.to_dict().items() if k != "schema_version"}
                for layer in layers]  # fmt: skip
        entries.append({
            "engine": engine,
            "layers": rows,
            "sparse_kernels": sum(layer.sparse for layer in layers),
            "sparse_weights": sum(layer.sparse_weights for layer in layers),
            "dense_2_4": sum(layer.sparse_weights and not layer.sparse for layer in layers),
        })  # fmt: skip
    return entries


def _sentences(entry: dict[str, Any]) -> tuple[str, str | None]:
    """The summary sentence and, when 2:4 weights ran dense, the warning."""
    summary = (
        f"{entry['engine']}: {len(entry['layers'])} layers, {entry['sparse_kernels']} on a 2:4 "
        f"sparse kernel, {entry['sparse_weights']} with 2:4 weights."
    )
    dense = entry["dense_2_4"]
    warning = None
    if dense:
        warning = (
            f"{dense} layer{'s' if dense != 1 else ''} with 2:4 weights ran a dense kernel: "
            "their pruning buys no speed in this engine (each layer's note says why)."
        )
    return summary, warning


def _row(layer: dict[str, Any]) -> list[Any]:
    return [
        layer["name"], layer["op"], layer["precision"],
        "yes" if layer["sparse_weights"] else "no", "yes" if layer["sparse"] else "no",
        layer["note"] or "",
    ]  # fmt: skip


def _markdown_rows(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All rows up to the limit; past it the 2:4 layers first, then the first ones, in order."""
    if len(layers) <= MAX_MARKDOWN_ROWS:
        return layers
    picked = [i for i, layer in enumerate(layers) if layer["sparse_weights"]][:MAX_MARKDOWN_ROWS]
    rest = [i for i in range(len(layers)) if i not in picked]
    picked += rest[: MAX_MARKDOWN_ROWS - len(picked)]
    return [layers[i] for i in sorted(picked)]


def engine_layers_lines(section: list[dict[str, Any]] | None, table: Callable) -> list[str]:
    """The Markdown rendering; ``table(header, rows, align)`` is the Markdown table helper."""
    if not section:
        return []
    lines = ["## Engine layers", "", "What each engine reports it runs, per layer."]
    for entry in section:
        summary, warning = _sentences(entry)
        lines += ["", summary]
        if warning:
            lines += ["", f"**Warning:** {warning}"]
        shown = _markdown_rows(entry["layers"])
        if len(shown) < len(entry["layers"]):
            shown_text = (
                f"Showing {len(shown)} of {len(entry['layers'])} layers (the 2:4 ones first); "
                "all are in report.html and report.json."
            )
            lines += ["", shown_text]
        lines += ["", *table(COLUMNS, [_row(layer) for layer in shown])]
    return lines


def engine_layers_html(section: list[dict[str, Any]] | None, table: Callable) -> str:
    """The HTML rendering; ``table(header, rows, align)`` is the page's table helper."""
    if not section:
        return ""
    parts = ["<h2>Engine layers</h2>"]
    for entry in section:
        summary, warning = _sentences(entry)
        parts.append(f"<h3>{html.escape(entry['engine'])}</h3><p>{html.escape(summary)}</p>")
        if warning:
            parts.append(f'<p class="warning">Warning: {html.escape(warning)}</p>')
        parts.append(table(COLUMNS, [_row(layer) for layer in entry["layers"]]))
    return "".join(parts)
