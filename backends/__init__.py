"""The lazy backend registry: backend names to the modules that implement them.

``get_backend(name)`` imports ``deploycomp.backends.<name>`` on first use and returns a cached
:class:`~deploycomp.backends.base.Backend` instance; importing this package imports no backend
library (onnxruntime, openvino, tensorrt are only imported inside a backend's build or load).
``availability_table()`` says for every known backend whether it can run here and why not.
"""

from __future__ import annotations

import importlib

from deploycomp.backends.base import Availability, Backend, BuildConfig, Session
from deploycomp.errors import BackendError, closest_match_hint

__all__ = [
    "Availability",
    "Backend",
    "BuildConfig",
    "Session",
    "availability_table",
    "backend_names",
    "get_backend",
]

# name -> (module under deploycomp.backends, class name); the name is the library's import name.
_REGISTRY: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnxruntime", "OnnxRuntimeBackend"),
    "openvino": ("openvino", "OpenVinoBackend"),
    "tensorrt": ("tensorrt", "TensorRtBackend"),
    "torch": ("torch_cuda", "TorchCudaBackend"),
}
_INSTANCES: dict[str, Backend] = {}


def backend_names() -> list[str]:
    """The names of all known backends, in order of preference on a CPU.

    Example:
        >>> backend_names()
        ['onnxruntime', 'openvino', 'tensorrt', 'torch']
    """
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend called ``name``, imported on first use.

    Args:
        name: one of :func:`backend_names`.

    Returns:
        A shared :class:`Backend` instance (backends hold no per-build state).

    Raises:
        BackendError: ``name`` is not a known backend.

    Example:
        >>> get_backend("onnxruntime").availability().available
        True
    """
    if name not in _REGISTRY:
        raise BackendError(
            f"unknown backend {name!r}; expected one of {backend_names()}."
            f"{closest_match_hint(name, _REGISTRY)}"
        )
    if name not in _INSTANCES:
        module_name, class_name = _REGISTRY[name]
        module = importlib.import_module(f"{__name__}.{module_name}")
        _INSTANCES[name] = getattr(module, class_name)()
    return _INSTANCES[name]


def availability_table() -> list[tuple[str, Availability]]:
    """``(name, Availability)`` for every known backend; never raises, imports no backend library.

    Example:
        >>> for name, avail in availability_table():
        ...     print(name, avail.available, avail.reason)
    """
    return [(name, get_backend(name).availability()) for name in _REGISTRY]
