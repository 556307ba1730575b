"""Built-in models with real weights and real data, each returned as a ready ``ModelSpec``.

``names()`` lists the entries and ``load(name)`` builds one: the fp32 module in eval mode, example
inputs, calibration batches and labelled or agreement eval sets. Entries import their heavy or
optional packages (transformers, the EfficientNet packages) only when loaded; a missing one raises
:class:`~deploycomp.errors.ModelLoadError` naming the ``pip install`` that fixes it. All subsets and
augmentations are seeded, so every load returns the same data.
"""

from __future__ import annotations

import importlib

from deploycomp.errors import ModelLoadError, closest_match_hint
from deploycomp.modelspec import ModelSpec

# name -> module defining ``load(*, eval_limit)``; modules are imported on first use.
_REGISTRY: dict[str, str] = {
    "fmnist-cnn": "deploycomp.zoo.fmnist_cnn",
    "efficientnet-lite0": "deploycomp.zoo.efficientnet_lite0",
    "minilm-l6": "deploycomp.zoo.minilm",
}


def names() -> list[str]:
    """The names ``load`` accepts.

    Example:
        >>> names()
        ['fmnist-cnn', 'efficientnet-lite0', 'minilm-l6']
    """
    return list(_REGISTRY)


def load(name: str, *, eval_limit: int | None = None) -> ModelSpec:
    """Build the zoo model ``name``.

    Args:
        name: one of :func:`names`.
        eval_limit: keep at most this many samples in each eval set (for quick tests);
            ``None`` keeps the full sets.

    Returns:
        The model spec, with the model in eval mode.

    Raises:
        ModelLoadError: unknown name, missing optional package or missing weights.
        DataError: the dataset behind the entry is not installed.

    Example:
        >>> spec = load("fmnist-cnn", eval_limit=1000)
        >>> spec.example_inputs["input"].shape
        (8, 1, 28, 28)
    """
    if name not in _REGISTRY:
        raise ModelLoadError(
            f"unknown zoo model {name!r}; known: {', '.join(names())}."
            + closest_match_hint(str(name), names())
        )
    module = importlib.import_module(_REGISTRY[name])
    return module.load(eval_limit=eval_limit)


__all__ = ["load", "names"]
