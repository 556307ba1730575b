"""The onnxruntime lowerer on deploycomp's own QDQ export: exact re-quantization, INT8 fusion."""

import numpy as np
import onnx
from _qdq_models import qdq_arithmetic
from torch import nn

from deploycomp.backends import BuildConfig, get_backend
from deploycomp.backends.onnxruntime import requantize_after_transparent_ops
from deploycomp.export.calibrate import calibrate
from deploycomp.export.check import ort_runner
from deploycomp.export.onnx_export import export_fp32
from deploycomp.export.qdq import LayerQuant, activation_sites, insert_qdq
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.inventory import build_inventory


def _qdq_cnn(tmp_path, shift=0.0):
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 10),
    ).eval()
    rng = np.random.default_rng(0)
    batches = [{"input": rng.random((16, 1, 14, 14), dtype=np.float32) - np.float32(shift)}
               for _ in range(2)]
    spec = ModelSpec("cnn", model, {"input": batches[0]["input"][:1]}, batches)
    fp32 = export_fp32(spec, tmp_path / "fp32.onnx")
    layers = [la for la in build_inventory(fp32, {"batch": 1}) if la.eligible]
    sites = activation_sites(fp32, {la.node for la in layers})
    ranges = calibrate(fp32, list(sites.values()), batches, progress=False)
    plan = {la.node: LayerQuant(la, "uint8_per_tensor" if ranges[sites[la.node]].non_negative
                                else "int8_sym_per_tensor") for la in layers}
    qdq = insert_qdq(fp32, plan, ranges)
    onnx.save(qdq, tmp_path / "model.onnx")
    return qdq, batches


def test_requantizing_after_pool_and_flatten_is_exact(tmp_path):
    qdq, batches = _qdq_cnn(tmp_path)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(qdq)
    assert requantize_after_transparent_ops(rewritten) == 2  # after MaxPool and after Flatten
    onnx.checker.check_model(rewritten)
    onnx.save(rewritten, tmp_path / "rewritten.onnx")
    before = qdq_arithmetic(tmp_path / "model.onnx", batches[0])
    after = qdq_arithmetic(tmp_path / "rewritten.onnx", batches[0])
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)


def test_engine_runs_every_layer_in_int8(tmp_path):
    _, batches = _qdq_cnn(tmp_path)
    engine = get_backend("onnxruntime").build(tmp_path / "model.onnx", tmp_path / "engine",
                                             BuildConfig())
    optimized = onnx.load(str(tmp_path / "engine" / "model.ort.onnx"))
    ops = [n.op_type for n in optimized.graph.node]
    assert "QLinearConv" in ops and "QGemm" in ops
    assert "Conv" not in ops and "Gemm" not in ops
    assert any("repeated" in note for note in engine.notes)
    session = get_backend("onnxruntime").load(engine)
    out = session.run(batches[1])[0]
    np.testing.assert_allclose(out, qdq_arithmetic(tmp_path / "model.onnx", batches[1]), atol=1e-4)



def test_signed_activations_become_uint8_exactly(tmp_path):
    from deploycomp.backends.onnxruntime import signed_activations_to_uint8

    qdq, batches = _qdq_cnn(tmp_path, shift=0.5)  # a signed input for the first conv
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(qdq)
    zps = {n.input[2] for n in rewritten.graph.node if n.op_type == "QuantizeLinear"}
    signed = [i for i in rewritten.graph.initializer if i.name in zps and i.data_type == 3]
    assert signed, "the input of the first conv is quantized as int8"
    assert signed_activations_to_uint8(rewritten) == len(signed)
    onnx.save(rewritten, tmp_path / "u8.onnx")
    before = ort_runner(str(tmp_path / "model.onnx"))(batches[0])
    after = ort_runner(str(tmp_path / "u8.onnx"))(batches[0])
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
