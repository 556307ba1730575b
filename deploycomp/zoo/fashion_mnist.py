"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: IDX files in, numpy arrays out.

``load_split("train")`` and ``load_split("test")`` return ``(images, labels)``: uint8 images of shape
(N, 28, 28) and int64 labels of shape (N,). The files are read from the standard Debian location
(or the folder named by ``DEPLOYCOMP_FASHION_MNIST_DIR``); a missing install raises
:class:`~deploycomp.errors.DataError` saying which package to install.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from deploycomp.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "DEPLOYCOMP_FASHION_MNIST_DIR"
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
# Mean and standard deviation of the train pixels scaled to [0, 1].
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530
_FILE_PREFIX = {"train": "train", "test": "t10k"}


def data_dir() -> Path:
    """The folder holding the four IDX files.

    Returns:
        ``$DEPLOYCOMP_FASHION_MNIST_DIR`` if set, else the Debian package's folder.
    """
    return Path(os.environ.get(ENV_DIR, DEBIAN_DIR))


def read_idx(path: Path, offset: int) -> np.ndarray:
    """Read the payload of a (possibly gzipped) IDX file as a flat uint8 array.

    Args:
        path: the ``.gz`` or raw IDX file.
        offset: header size in bytes: 16 for image files, 8 for label files.

    Returns:
        The bytes after the header.

    Example:
        >>> labels = read_idx(data_dir() / "t10k-labels-idx1-ubyte.gz", offset=8)
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    return np.frombuffer(raw, dtype=np.uint8, offset=offset)


@functools.lru_cache(maxsize=2)
def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).

    Returns:
        ``(images, labels)``: uint8 (N, 28, 28) and int64 (N,), read-only.

    Raises:
        DataError: unknown split, or the files are missing or truncated.

    Example:
        >>> images, labels = load_split("test")
    """
    if split not in _FILE_PREFIX:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'.")
    folder = data_dir()
    prefix = _FILE_PREFIX[split]
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [folder / f"{prefix}-{kind}-ubyte.gz", folder / f"{prefix}-{kind}-ubyte"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DataError(
                f"Fashion-MNIST file {candidates[0].name!r} not found in {str(folder)!r}. "
                "Install it with `apt-get install dataset-fashion-mnist`, or point "
                f"{ENV_DIR} at a folder holding the four IDX files."
            )
        paths.append(found)
    images = read_idx(paths[0], offset=16)
    labels = read_idx(paths[1], offset=8).astype(np.int64)
    if images.size != labels.size * 28 * 28:
        raise DataError(
            f"Fashion-MNIST {split} files disagree: {images.size} image bytes for {labels.size} "
            f"labels (expected {labels.size * 784}). Reinstall dataset-fashion-mnist."
        )
    images = images.reshape(-1, 28, 28)
    labels.flags.writeable = False
    return images, labels


def normalize(images: np.ndarray) -> np.ndarray:
    """Scale uint8 images to the float32 (N, 1, 28, 28) input of the CNN.

    Args:
        images: uint8 array of shape (N, 28, 28).

    Returns:
        ``(x / 255 - PIXEL_MEAN) / PIXEL_STD`` with a channel axis, float32.
    """
    x = images.astype(np.float32)[:, None] / 255.0
    return ((x - PIXEL_MEAN) / PIXEL_STD).astype(np.float32)
