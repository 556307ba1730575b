"""deploycomp: a hardware-aware deployment compiler for PyTorch models.

``compile_model`` runs the whole pipeline (plan, quantize, export, lower, measure, report). Importing
this package loads no backend library; backends are imported when used.
"""

from deploycomp._version import __version__
from deploycomp.errors import DeployCompError
from deploycomp.modelspec import EvalSet, ModelSpec

__all__ = ["DeployCompError", "EvalSet", "ModelSpec", "__version__", "compile_model"]


def __getattr__(name: str):
    if name == "compile_model":
        from deploycomp.api import compile_model

        return compile_model
    raise AttributeError(f"module 'deploycomp' has no attribute {name!r}")
