import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# What a marker needs, and how to tell whether this machine has it. Tests that need something
# absent skip with the reason, unless ``--require NAME`` was given: then they fail, so a machine
# that should have a GPU cannot pass a broken install as "all skipped".
_NEEDS = {
    "gpu": "an NVIDIA GPU visible to PyTorch (torch.cuda.is_available() is False here)",
    "tensorrt": "TensorRT and an NVIDIA GPU",
}


def _has(what: str) -> bool:
    if what == "gpu":
        return torch.cuda.is_available()
    from deploycomp.backends import get_backend

    return get_backend("tensorrt").availability().available


def pytest_addoption(parser):
    parser.addoption(
        "--require",
        action="append",
        default=[],
        choices=sorted(_NEEDS),
        help="fail, instead of skipping, the tests that need this (repeatable): --require gpu",
    )


@pytest.fixture(autouse=True)
def _needs(request):
    for what, needs in _NEEDS.items():
        if request.node.get_closest_marker(what) is None or _has(what):
            continue
        if what in request.config.getoption("--require"):
            pytest.fail(f"--require {what}: this test needs {needs}")
        pytest.skip(f"needs {needs}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
