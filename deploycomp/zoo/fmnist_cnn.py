"""The ``fmnist-cnn`` zoo entry: a small Fashion-MNIST CNN with committed weights.

:class:`FashionCNN` is two conv+BN+ReLU+max-pool blocks (32 and 64 channels) and two linear layers,
0.42 M parameters, trained by ``scripts/train_fmnist_cnn.py``. :func:`load` reads the committed
safetensors checkpoint and returns a :class:`~deploycomp.modelspec.ModelSpec` whose eval set is the
full labelled 10,000-image test split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from deploycomp.errors import ModelLoadError
from deploycomp.modelspec import EvalSet, ModelSpec
from deploycomp.zoo import _common
from deploycomp.zoo import fashion_mnist as fm

WEIGHTS_FILE = "fmnist_cnn.safetensors"
METADATA_FILE = "fmnist_cnn.json"
TRAIN_BATCH_SIZE = 128  # compression-aware training
TRAIN_SEED = 0
CALIBRATION_SEED = 0
CALIBRATION_BATCHES = 8
CALIBRATION_BATCH_SIZE = 32
EVAL_BATCH_SIZE = 500


class FashionCNN(nn.Module):
    """Conv(32)-BN-ReLU-Pool, Conv(64)-BN-ReLU-Pool, Linear(3136, 128)-ReLU, Linear(128, 10).

    Takes normalised images (N, 1, 28, 28) and returns logits (N, 10).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model() -> FashionCNN:
    """The trained CNN in eval mode, loaded from the committed checkpoint.

    Raises:
        ModelLoadError: the checkpoint is missing or does not match the architecture.
    """
    from safetensors.torch import load_file

    path = _common.weights_path(WEIGHTS_FILE)
    model = FashionCNN()
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise ModelLoadError(
            f"checkpoint {path.name!r} does not match FashionCNN: {exc}. Retrain it with "
            "scripts/train_fmnist_cnn.py."
        ) from exc
    return model.eval()


def load(*, eval_limit: int | None = None) -> ModelSpec:
    """Load ``fmnist-cnn``.

    Input ``"input"``: float32 (N, 1, 28, 28), pixels scaled as ``(x/255 - 0.2860) / 0.3530``.
    Calibration: 8 batches of 32 train images drawn without replacement (seed 0). Eval set
    ``"fashion-mnist-test"``: the labelled test split in batches of 500.

    Args:
        eval_limit: keep only the first ``eval_limit`` test images (for quick tests).

    Returns:
        The model spec.

    Example:
        >>> spec = load(eval_limit=1000)
        >>> spec.eval_sets[0].num_samples
        1000
    """
    model = build_model()
    train_images, _ = fm.load_split("train")
    test_images, test_labels = fm.load_split("test")

    rng = np.random.default_rng(CALIBRATION_SEED)
    n_cal = CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE
    cal_index = rng.choice(len(train_images), size=n_cal, replace=False)
    calibration = _common.split_batches(
        {"input": fm.normalize(train_images[cal_index])}, CALIBRATION_BATCH_SIZE
    )

    n_eval = _common.limit(len(test_images), len(test_images), eval_limit)
    eval_inputs = {"input": fm.normalize(test_images[:n_eval])}
    eval_set = EvalSet(
        name="fashion-mnist-test",
        batches=_common.split_batches(eval_inputs, EVAL_BATCH_SIZE),
        labels=np.array(test_labels[:n_eval]),
        metric="top1",
        description=f"Fashion-MNIST test split, first {n_eval} of 10,000 labelled images",
    )
    pool = {"input": eval_inputs["input"][:EVAL_BATCH_SIZE]}
    return ModelSpec(
        batch_sizes=(1, 64),
        name="fmnist-cnn",
        model=model,
        example_inputs={"input": pool["input"][:8].copy()},
        calibration=calibration,
        eval_sets=[eval_set],
        make_batch=lambda batch_size: _common.tile_batch(pool, batch_size),
        description="Fashion-MNIST CNN (2 conv blocks, 2 linear, 0.42 M params), fp32",
        train_data=lambda: _train_batches(train_images),
    )


def _train_batches(images: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The 60,000 train images (labels dropped), shuffled with a fixed seed, in full batches."""
    order = np.random.default_rng(TRAIN_SEED).permutation(len(images))
    usable = len(order) - len(order) % TRAIN_BATCH_SIZE
    inputs = {"input": fm.normalize(images[order[:usable]])}
    return _common.split_batches(inputs, TRAIN_BATCH_SIZE)
