"""The torch backend's kernels and engines on an NVIDIA GPU (skipped without one; run with
``--require gpu`` on a GPU machine so a broken install cannot pass as skipped).

Every check draws fresh random inputs and compares against a float64/fp32 reference by relative
error ``||out - ref|| / ||ref||``; tolerances are stated where they are used.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _qdq_models import export_encoder, ort_reference

from deploycomp.backends import BuildConfig, get_backend
from deploycomp.kernels import gemm
from deploycomp.kernels.sparsity import apply_2_4

pytestmark = pytest.mark.gpu

FP16_TOL = 2e-3  # fp16 output of an exact int32 (or fp32-accumulated) product: ~5e-4 measured


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("m,k,n", [(8, 64, 32), (33, 256, 128), (1000, 768, 3072)])
def test_int8_gemm_matches_reference(m, k, n):
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    alpha = torch.rand(n, device="cuda") * 1e-3 + 1e-5
    out = gemm.int8_gemm(xq, wq, alpha, torch.float16)
    assert out.shape == (m, n) and out.dtype == torch.float16
    assert _rel(out, gemm.int8_gemm_reference(xq, wq, alpha)) < FP16_TOL


@pytest.mark.skipif(not gemm.sparse_kernels_available(), reason="needs cuSPARSELt (sm_80+)")
@pytest.mark.parametrize("m,k,n", [(64, 256, 256), (4096, 768, 3072)])
def test_sparse_int8_gemm_matches_dense_reference(m, k, n):
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    w = apply_2_4(torch.randn(n, k, device="cuda"))
    scale = w.abs().amax(1) / 127
    wq = torch.round(w / scale[:, None]).to(torch.int8)
    alpha = scale * 0.01
    out = gemm.sparse_int8_gemm(xq, gemm.compress_2_4_weight(wq), alpha, torch.float16)
    assert out.shape == (m, n)
    assert _rel(out, gemm.int8_gemm_reference(xq, wq, alpha)) < FP16_TOL


@pytest.mark.skipif(not gemm.sparse_kernels_available(), reason="needs cuSPARSELt (sm_80+)")
def test_sparse_float_gemm_matches_reference():
    x = torch.randn(512, 1024, device="cuda", dtype=torch.float16)
    w = apply_2_4(torch.randn(2048, 1024, device="cuda")).half()
    out = gemm.sparse_float_gemm(x, gemm.compress_2_4_weight(w))
    assert _rel(out, x.double() @ w.double().t()) < FP16_TOL


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    # hidden 512 / ffn 2048 at 32 x 16 tokens: wide enough for the sparse kernels
    return export_encoder(
        tmp_path_factory.mktemp("enc"), 512, 2048, 32, {"int8": "int8", "int4": "int4"}
    )


@pytest.mark.parametrize("runtime", ["eager", "compile"])
@pytest.mark.parametrize("name", ["fp32", "int8", "int4"])
def test_engine_matches_onnxruntime_and_reports_its_kernels(encoder, tmp_path, name, runtime):
    fp32, paths, test = encoder
    path = fp32 if name == "fp32" else paths[name]
    backend = get_backend("torch")
    config = BuildConfig("compiled", device="cuda", extra={"batch_size": 32, "runtime": runtime})
    engine = backend.build(path, tmp_path / "engine", config)
    session = backend.load(engine)
    out = session.run(test)[0]
    ref = ort_reference(path, test)
    # fp16 activations through LayerNorm, attention and four GEMMs: ~3e-3 measured
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-2
    layers = json.loads((tmp_path / "engine" / "layers.json").read_text())["layers"]
    assert len(layers) == 4
    assert all(la["sparse_weights"] for la in layers)  # every weight was pruned 2:4
    for la in layers:
        if la["sparse"]:  # kept only where it measured faster than dense
            times = dict(
                part.rsplit(" ", 2)[0:2]
                for part in la["note"].removeprefix("measured ").split("; ")[0].split(", ")
            )
            sparse = float(times[la["kernel"]])
            dense = min(float(v) for k, v in times.items() if not k.startswith("2:4"))
            assert sparse <= dense
    if name == "int8":
        assert {la["precision"] for la in layers} == {"int8"}
    if name == "int4":
        assert {la["kernel"] for la in layers} <= {"int4", "2:4 float"}
    # the bound call runs the CUDA graph on device buffers and gives the same result
    call = session.bind(test)
    call()
    bound = call.outputs[0].float().cpu().numpy()
    assert np.allclose(bound, out, rtol=1e-2, atol=1e-2)


def test_unknown_float_dtype_is_a_clear_error(encoder, tmp_path):
    from deploycomp.errors import BackendError

    fp32, _, _ = encoder
    config = BuildConfig("compiled", device="cuda", extra={"float_dtype": "fp8"})
    with pytest.raises(BackendError, match="float_dtype 'fp8'"):
        get_backend("torch").build(fp32, tmp_path / "e", config)
    assert not (tmp_path / "e").exists()


def test_availability_names_the_gpu():
    avail = get_backend("torch").availability()
    assert avail.available
    assert torch.cuda.get_device_name() in avail.reason
