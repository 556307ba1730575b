"""The torch backend built, loaded and run on the CPU: the build/load/run path of the GPU engine
(kernel choice, layers.json, kernels.json, bind) on the kernels the CPU has."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _qdq_models import export_encoder, ort_reference

from deploycomp.backends import BuildConfig, get_backend
from deploycomp.errors import BackendError
from deploycomp.measure.latency import measure_latency


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return export_encoder(
        tmp_path_factory.mktemp("enc"), 64, 256, 4, {"int8": "int8", "int4": "int4"}
    )


@pytest.mark.parametrize(
    ("name", "kernel"), [("fp32", "float"), ("int8", "int8"), ("int4", "float")]
)
def test_cpu_engine_runs_the_graph_and_lists_its_layers(encoder, tmp_path, name, kernel):
    fp32, paths, test = encoder
    path = fp32 if name == "fp32" else paths[name]
    backend = get_backend("torch")
    engine = backend.build(path, tmp_path / "engine", BuildConfig("compiled", device="cpu"))
    assert engine.device == "cpu" and engine.build_config["runtime"] == "eager"
    assert {"model.onnx", "kernels.json", "layers.json", "engine.json"} <= {
        p.name for p in (tmp_path / "engine").iterdir()
    }
    layers = json.loads((tmp_path / "engine" / "layers.json").read_text())
    assert layers["backend"] == "torch"
    assert [la["kernel"] for la in layers["layers"]] == [kernel] * 4
    # every weight is 2:4, but the CPU has no sparse kernel: reported, never silently dense
    assert all(la["sparse_weights"] and not la["sparse"] for la in layers["layers"])
    assert all("no sparse kernel runs here" in la["note"] for la in layers["layers"])
    session = backend.load(engine)
    out = session.run(test)[0]
    ref = ort_reference(path, test)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4
    call = session.bind(test)
    call()
    assert np.allclose(call.outputs[0].numpy(), out)


def test_cpu_engines_time_interleaved(encoder, tmp_path):
    fp32, paths, test = encoder
    backend = get_backend("torch")
    sessions = {
        name: backend.load(backend.build(p, tmp_path / name, BuildConfig(name, device="cpu")))
        for name, p in (("fp32", fp32), ("compiled", paths["int8"]))
    }
    result = measure_latency(sessions, test, warmup_runs=1, block_runs=2, rounds=2, progress=False)
    assert all(s.median_ms > 0 for s in result.stats.values())


def test_availability_on_the_cpu_says_what_runs(encoder):
    import torch

    avail = get_backend("torch").availability()
    assert avail.available
    if not torch.cuda.is_available():
        assert "CPU only" in avail.reason and "NVIDIA GPU" in avail.reason
        assert get_backend("torch").default_device() == "cpu"


def test_cuda_build_without_a_gpu_is_a_clear_error(encoder, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    fp32, _, _ = encoder
    with pytest.raises(BackendError, match="no CUDA GPU is visible"):
        get_backend("torch").build(fp32, tmp_path / "e", BuildConfig(device="cuda"))
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e*"))


def test_symbolic_axes_need_input_shapes(tmp_path):
    from _qdq_models import TinyEncoder

    from deploycomp.export.onnx_export import export_fp32
    from deploycomp.modelspec import ModelSpec

    ids = np.zeros((1, 16), dtype=np.int64)
    spec = ModelSpec(
        "enc", TinyEncoder(32, 64).eval(), {"ids": ids}, [], dynamic_axes={"ids": {1: "seq"}}
    )
    export_fp32(spec, tmp_path / "m.onnx")
    backend = get_backend("torch")
    with pytest.raises(BackendError, match="symbolic axis 1.*input_shapes"):
        backend.build(tmp_path / "m.onnx", tmp_path / "e", BuildConfig(device="cpu"))
    config = BuildConfig(device="cpu", extra={"input_shapes": {"ids": [2, 16]}})
    engine = backend.build(tmp_path / "m.onnx", tmp_path / "e", config)
    assert engine.build_config["input_shapes"] == {"ids": [2, 16]}
