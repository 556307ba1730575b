"""Write the three report files into a run directory: report.json (the summary dict from
:func:`~deploycomp.report.summary.build_report`), report.md and report.html. Each file is written to
a temporary file and renamed into place, so a failed render never leaves a partial report.
"""

from __future__ import annotations

from pathlib import Path

from deploycomp.artifacts import write_json_atomic, write_text_atomic
from deploycomp.report.html import render_html
from deploycomp.report.markdown import render_markdown
from deploycomp.report.summary import build_report

REPORT_FILES = {"json": "report.json", "md": "report.md", "html": "report.html"}


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Build the report of a run directory and write report.json, report.md and report.html in it.

    All three are rendered before any is written, so a rendering error leaves the directory as it
    was.

    Args:
        run_dir: the directory the pipeline wrote.

    Returns:
        The written paths keyed by format: ``{"json": ..., "md": ..., "html": ...}``.

    Raises:
        OutputDirError: ``run_dir`` is not a directory or holds a malformed artifact.

    Example:
        >>> paths = write_report("out/fashion_mlp")
        >>> print(paths["md"].read_text())
    """
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    markdown = render_markdown(report)
    page = render_html(report)
    return {
        "json": write_json_atomic(run_dir / REPORT_FILES["json"], report),
        "md": write_text_atomic(run_dir / REPORT_FILES["md"], markdown),
        "html": write_text_atomic(run_dir / REPORT_FILES["html"], page),
    }
