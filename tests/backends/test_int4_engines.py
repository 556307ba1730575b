"""Mixed INT4 / INT8 QDQ models from deploycomp's writer, built and run by both CPU backends.

The model is an embedding table, a residual MLP on [batch, seq, hidden] (MatMul) and a head on the
mean (Gemm). The plan stores the table and the MLP's up projection in INT4 (weight-only), runs the
down projection in W8A8 and keeps the head's weight in int8 (weight-only). The reference is the
torch model with every weight replaced by its dequantized value, computed with the kernels (not
read back from the graph), and the down projection's input fake-quantized at the exported scale.
Both engines quantize activations on the fly inside their weight-only kernels (onnxruntime's
MatMulNBits at accuracy level 4, openvino's dynamic quantization), hence an SQNR bound rather than
an elementwise one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deploycomp.backends import BuildConfig, get_backend
from deploycomp.export.calibrate import calibrate
from deploycomp.export.onnx_export import export_fp32
from deploycomp.export.qdq import LayerQuant, activation_sites, insert_qdq, safe_name
from deploycomp.kernels.int4 import dequantize_int4_groupwise, quantize_int4_groupwise
from deploycomp.kernels.quantize import fake_quantize, quantize_weight_per_channel
from deploycomp.measure.accuracy import sqnr_db
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.inventory import build_inventory

VOCAB, HIDDEN, FFN, CLASSES, SEQ, GROUP = 256, 64, 256, 10, 12, 32
MIN_SQNR_DB = 35.0  # measured 44.7 dB on both engines (their on-the-fly int8 activations)
EXACT_ATOL = 1e-5  # the graph without backend fusions against the reference (measured 1.2e-7)


class TinyText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h.mean(dim=1))


def _int4(weight: torch.Tensor) -> torch.Tensor:
    return dequantize_int4_groupwise(*quantize_int4_groupwise(weight, GROUP), GROUP)


def _int8(weight: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_weight_per_channel(weight.numpy(), 0)
    return torch.from_numpy(q.astype(np.float32) * scale[:, None])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(dir, mixed QDQ path, all-INT8 path, reference logits, test batch)."""
    root = tmp_path_factory.mktemp("int4")
    torch.manual_seed(0)
    model = TinyText().eval()
    rng = np.random.default_rng(0)
    batches = [{"ids": rng.integers(0, VOCAB, (8, SEQ)).astype(np.int64)} for _ in range(3)]
    spec = ModelSpec("text", model, {"ids": batches[0]["ids"][:1]}, batches[:2])
    fp32 = export_fp32(spec, root / "fp32.onnx")
    layers = {la.name: la for la in build_inventory(fp32, {"batch": 1})}
    embed, up, down, head = (layers[name] for name in ("embed", "up", "down", "head"))
    assert embed.kind == "embedding"
    site = activation_sites(fp32, {down.node})[down.node]
    ranges = calibrate(fp32, [site], batches[:2], progress=False)
    int4 = f"int4_sym_group{GROUP}"
    mixed = {
        embed.node: LayerQuant(embed, "fp32", int4),
        up.node: LayerQuant(up, "fp32", int4),
        down.node: LayerQuant(down, "uint8_per_tensor"),
        head.node: LayerQuant(head, "fp32"),
    }
    all_int8 = {**mixed, embed.node: LayerQuant(embed, "fp32"), up.node: LayerQuant(up, "fp32")}
    for name, plan in (("mixed.onnx", mixed), ("int8.onnx", all_int8)):
        qdq = insert_qdq(fp32, plan, ranges)
        onnx.checker.check_model(qdq, full_check=True)
        onnx.save(qdq, root / name)
    # Reference: dequantized weights in torch, the down projection's input fake-quantized at the
    # scale the graph carries.
    qdq = onnx.load(str(root / "mixed.onnx"))
    x_scale = next(
        float(onnx.numpy_helper.to_array(i))
        for i in qdq.graph.initializer
        if i.name == f"{safe_name(site)}_scale"
    )
    with torch.no_grad():
        model.embed.weight.copy_(_int4(model.embed.weight))
        model.up.weight.copy_(_int4(model.up.weight))
        model.down.weight.copy_(_int8(model.down.weight))
        model.head.weight.copy_(_int8(model.head.weight))
    model.down.register_forward_pre_hook(
        lambda _, args: torch.from_numpy(fake_quantize(args[0].numpy(), x_scale, "uint8"))
    )
    test = batches[2]
    with torch.no_grad():
        reference = model(torch.from_numpy(test["ids"])).numpy()
    return root, root / "mixed.onnx", root / "int8.onnx", reference, test


def test_int4_model_is_opset_21_and_smaller_than_int8(exported):
    _, mixed, int8, _, _ = exported
    model = onnx.load(str(mixed))
    assert next(o.version for o in model.opset_import if o.domain == "") == 21
    int4_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4_weights) == 2  # the table and the up projection
    assert mixed.stat().st_size < 0.8 * int8.stat().st_size


def test_graph_computes_the_dequantized_reference(exported):
    import onnxruntime as ort

    _, mixed, _, reference, test = exported
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # no fusion
    session = ort.InferenceSession(str(mixed), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, test)[0], reference, rtol=0, atol=EXACT_ATOL)


def test_onnxruntime_fuses_int4_matmul_and_matches_reference(exported):
    root, mixed, _, reference, test = exported
    backend = get_backend("onnxruntime")
    engine = backend.build(mixed, root / "ort", BuildConfig(threads=1))
    optimized = onnx.load(str(root / "ort" / "model.ort.onnx"))
    nbits = {
        n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in optimized.graph.node
        if n.op_type == "MatMulNBits"
    }
    # The INT4 up projection and the int8 weight-only head run as MatMulNBits; the W8A8 down
    # projection as an integer MatMul.
    assert sorted(a["bits"] for a in nbits.values()) == [4, 8]
    assert all(a["accuracy_level"] == 4 for a in nbits.values())
    assert engine.build_config["qdq_matmulnbits_accuracy_level"] == 4
    assert "Gemm" not in {n.op_type for n in optimized.graph.node}
    (logits,) = backend.load(engine).run(test)
    assert sqnr_db(reference, logits) > MIN_SQNR_DB


@pytest.mark.openvino
def test_openvino_keeps_int4_constants_and_matches_reference(exported):
    ov = pytest.importorskip("openvino", reason="openvino is not installed: pip install openvino")
    root, mixed, int8, reference, test = exported
    backend = get_backend("openvino")
    engine = backend.build(mixed, root / "ov", BuildConfig(threads=1))
    # The IR stores the table and the up projection as i4 constants, every element of them.
    ir = ov.Core().read_model(str(root / "ov" / "model.xml"))
    i4_elements = sum(
        int(np.prod(list(op.get_output_shape(0))))
        for op in ir.get_ops()
        if op.get_type_name() == "Constant"
        and op.get_output_element_type(0).get_type_name() == "i4"
    )
    assert i4_elements == VOCAB * HIDDEN + HIDDEN * FFN
    # The CPU plugin runs the up projection and the lookup on the compressed weights.
    assert engine.build_config["runtime_precisions"].get("FullyConnected:i4") == 1
    compiled = ov.Core().compile_model(str(root / "ov" / "model.xml"), "CPU")
    runtime = {
        (
            op.get_rt_info()["layerType"].astype(str),
            op.get_rt_info()["runtimePrecision"].astype(str),
        )
        for op in compiled.get_runtime_model().get_ordered_ops()
    }
    assert ("Gather", "i4") in runtime
    (logits,) = backend.load(engine).run(test)
    assert sqnr_db(reference, logits) > MIN_SQNR_DB
    int8_engine = backend.build(int8, root / "ov_int8", BuildConfig(threads=1))
    int4_bin = (root / "ov" / "model.bin").stat().st_size
    assert int4_bin < 0.8 * (root / "ov_int8" / "model.bin").stat().st_size
    assert int8_engine.precision == "int8"
