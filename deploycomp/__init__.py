"""deploycomp: a hardware-aware deployment compiler for PyTorch models.

``compile_model`` runs the whole pipeline (plan, quantize, export, lower, measure, report). Importing
this package loads neither torch nor a backend library; they are imported when used.
"""

from deploycomp._version import __version__
from deploycomp.errors import DeployCompError

__all__ = ["DeployCompError", "EvalSet", "ModelSpec", "__version__", "compile_model"]


def __getattr__(name: str):
    # Lazy, so that the command line starts (and handles Ctrl-C) before torch is imported.
    if name == "compile_model":
        from deploycomp.api import compile_model

        return compile_model
    if name in ("EvalSet", "ModelSpec"):
        from deploycomp import modelspec

        return getattr(modelspec, name)
    raise AttributeError(f"module 'deploycomp' has no attribute {name!r}")
