"""The report's "Pruning" section, from a run's ``pruning.json`` (runs compiled with --prune).

Per channel group: its layers, channels (or heads) before and after, and why; the groups the
dependency graph refused, with the reason; parameters before and after. The latency and accuracy
sections of the same report compare the engines with the fp32 baseline, the unpruned model.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

COLUMNS = ("layers", "unit", "before", "after", "reason")


def pruning_section(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON report's ``pruning`` entry: the record as written, or None without one."""
    return record


def _summary(section: dict[str, Any]) -> str:
    before, after = section["params_before"], section["params_after"]
    return (
        f"Kept {section['keep_fraction']:.0%} of every prunable group (rounded up to multiples of "
        f"{section['channel_multiple']}), trained {section['steps']} steps with distillation from "
        f"the unpruned model: {before:,} -> {after:,} parameters ({after / before:.0%}). The fp32 "
        "baseline and the accuracy reference are the unpruned model."
    )


def _rows(section: dict[str, Any]) -> list[list[Any]]:
    return [
        [", ".join(g["members"]), g["unit"], g["before"], g["after"], g["reason"]]
        for g in section["groups"]
    ]


def pruning_lines(section: dict[str, Any] | None, table: Callable) -> list[str]:
    """The Markdown rendering; ``table(header, rows, align)`` is the Markdown table helper."""
    if not section:
        return []
    lines = ["## Pruning", "", _summary(section), "", *table(COLUMNS, _rows(section))]
    if section["refused"]:
        lines += ["", "Not pruned:"]
        lines += [f"- {name}: {why}" for name, why in section["refused"].items()]
    return lines


def pruning_html(section: dict[str, Any] | None, table: Callable) -> str:
    """The HTML rendering; ``table(header, rows, align)`` is the page's table helper."""
    if not section:
        return ""
    parts = ["<h2>Pruning</h2>", f"<p>{html.escape(_summary(section))}</p>"]
    parts.append(table(COLUMNS, _rows(section)))
    if section["refused"]:
        items = "".join(
            f"<li>{html.escape(name)}: {html.escape(why)}</li>"
            for name, why in section["refused"].items()
        )
        parts.append(f"<p>Not pruned:</p><ul>{items}</ul>")
    return "".join(parts)
