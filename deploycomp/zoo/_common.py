"""Helpers shared by the zoo loaders: the weights folder, batching, seeded subsets, optional imports.

Nothing here imports a heavy library; each loader imports its own optional packages through
:func:`require` so a missing one becomes a :class:`~deploycomp.errors.ModelLoadError` that names
the ``pip install`` that fixes it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from deploycomp.errors import ModelLoadError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def require(module: str, pip_name: str) -> ModuleType:
    """Import an optional module, or explain which package provides it.

    Args:
        module: import name, e.g. ``"transformers"``.
        pip_name: the distribution to install, e.g. ``"transformers"``.

    Returns:
        The imported module.

    Raises:
        ModelLoadError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelLoadError(
            f"the zoo model needs the Python package {module!r}, which is not installed. "
            f"Fix: `pip install {pip_name}` (or `pip install 'deploycomp[zoo]'` for all zoo extras)."
        ) from exc


def weights_path(filename: str) -> Path:
    """Path of a committed weight or metadata file, checked to exist.

    Raises:
        ModelLoadError: the file is missing from the installed package.
    """
    path = WEIGHTS_DIR / filename
    if not path.is_file():
        raise ModelLoadError(
            f"zoo weight file {filename!r} is missing from deploycomp/zoo/weights; reinstall "
            "deploycomp or regenerate it with the script named in the neighbouring .json."
        )
    return path


def read_metadata(filename: str) -> dict[str, Any]:
    """The JSON metadata committed beside a weight file."""
    return json.loads(weights_path(filename).read_text(encoding="utf-8"))


def limit(n_available: int, n_default: int, eval_limit: int | None) -> int:
    """How many samples an eval set holds: the default, truncated by ``eval_limit``.

    Raises:
        ModelLoadError: ``eval_limit`` is not a positive integer.
    """
    n = min(n_available, n_default)
    if eval_limit is None:
        return n
    if isinstance(eval_limit, bool) or not isinstance(eval_limit, int) or eval_limit < 1:
        raise ModelLoadError(f"eval_limit must be a positive integer or None, got {eval_limit!r}.")
    return min(n, eval_limit)


def split_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Cut named arrays (same length on axis 0) into consecutive batches; the last may be short."""
    n = len(next(iter(arrays.values())))
    return [
        {name: np.ascontiguousarray(a[start : start + batch_size]) for name, a in arrays.items()}
        for start in range(0, n, batch_size)
    ]


def tile_batch(pool: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """A batch of ``batch_size`` samples taken in order from ``pool``, repeating it if too small.

    Raises:
        ModelLoadError: ``batch_size`` is not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ModelLoadError(f"batch_size must be a positive integer, got {batch_size!r}.")
    n = len(next(iter(pool.values())))
    index = np.arange(batch_size) % n
    return {name: np.ascontiguousarray(a[index]) for name, a in pool.items()}
