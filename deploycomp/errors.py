"""The error hierarchy. Every failure a user can cause is a DeployCompError subclass.

Messages say what was wrong, the value found, what was expected and how to fix it. The CLI prints
the message on one line and exits 1; a traceback is shown only with ``-v``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DeployCompError(Exception):
    """Base class of every user-facing deploycomp failure."""


class ProfileError(DeployCompError):
    """A hardware profile is unknown or malformed."""


class ModelLoadError(DeployCompError):
    """A model, checkpoint, ONNX file or entrypoint could not be loaded."""


class DataError(DeployCompError):
    """Calibration or evaluation data has the wrong shape, dtype or values."""


class BackendError(DeployCompError):
    """A backend is unknown, unavailable, or failed to build or run an engine."""


class ExportError(DeployCompError):
    """Export to ONNX failed, or the exported model disagrees with the torch model."""


class OutputDirError(DeployCompError):
    """The output directory cannot be used."""


class AccuracyGuardError(DeployCompError):
    """The compiled engines missed the accuracy guard. The run directory was written (its report
    shows why) and :attr:`report` holds the report."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def closest_match_hint(value: str, known: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix naming the closest known name, or '' if none is close."""
    matches = difflib.get_close_matches(value, list(known), n=1, cutoff=0.5)
    return f" Did you mean {matches[0]!r}?" if matches else ""
