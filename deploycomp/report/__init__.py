"""The report stage: reads a run directory (plan, exported model, engines, measurement, target and
run metadata) and turns it into report.json for machines, report.md for terminals and pull requests,
and a self-contained report.html with plots. ``build_report`` computes the summary (speedups as
ratios of medians measured in the same run, accuracy drops, verdicts), ``render_markdown`` and
``render_html`` render it, and ``write_report`` writes all three files atomically.
"""

from __future__ import annotations

from deploycomp.report.html import render_html
from deploycomp.report.markdown import render_markdown
from deploycomp.report.summary import REPORT_SCHEMA_VERSION, build_report
from deploycomp.report.write import REPORT_FILES, write_report

__all__ = [
    "REPORT_FILES",
    "REPORT_SCHEMA_VERSION",
    "build_report",
    "render_html",
    "render_markdown",
    "write_report",
]
