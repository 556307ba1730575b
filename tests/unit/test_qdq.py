"""The QDQ rewrite on small models built in code: numerics, placement and storage."""

import numpy as np
import onnx
import pytest
import torch
from _qdq_models import qdq_arithmetic
from onnx import numpy_helper
from torch import nn

from deploycomp.export.calibrate import calibrate
from deploycomp.export.onnx_export import export_fp32, torch_outputs
from deploycomp.export.qdq import LayerQuant, activation_sites, insert_qdq
from deploycomp.measure.accuracy import sqnr_db
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.inventory import build_inventory


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
            nn.Conv2d(16, 32, 1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 10))

    def forward(self, x):
        return self.head(self.features(x))


class TinyEncoder(nn.Module):
    """Linear layers on a 3-D input, as inside a transformer block (MatMul with a constant)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return self.out(h.mean(dim=1))


def _quantize(model, example, tmp_path, batches):
    spec = ModelSpec("m", model.eval(), {"input": example}, batches)
    fp32 = export_fp32(spec, tmp_path / "fp32.onnx")
    layers = [layer for layer in build_inventory(fp32, {"batch": 2}) if layer.eligible]
    sites = activation_sites(fp32, {layer.node for layer in layers})
    ranges = calibrate(fp32, list(sites.values()), batches, progress=False)
    plan = {
        layer.node: LayerQuant(
            layer,
            "uint8_per_tensor" if ranges[sites[layer.node]].non_negative else "int8_sym_per_tensor",
        )
        for layer in layers
    }
    qdq = insert_qdq(fp32, plan, ranges)
    onnx.checker.check_model(qdq)
    onnx.save(qdq, tmp_path / "q.onnx")
    return spec, fp32, qdq, layers, sites, ranges


def test_cnn_qdq_matches_torch_and_stores_int8_weights(tmp_path):
    rng = np.random.default_rng(0)
    batches = [{"input": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    model = SmallCNN()
    spec, fp32, qdq, layers, sites, ranges = _quantize(model, batches[0]["input"][:1], tmp_path,
                                                       batches)
    assert [layer.kind for layer in layers] == ["conv2d", "conv2d_depthwise", "conv2d", "linear"]
    test = {"input": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)}
    ref = torch_outputs(model, test, ["input"])
    out = qdq_arithmetic(tmp_path / "q.onnx", test)
    assert sqnr_db(ref, out) > 25.0
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    # Every weight is stored as int8 in [-127, 127] with one scale per output channel; no fp32
    # copy of a quantized weight is left in the graph.
    for layer in layers:
        from deploycomp.export.qdq import safe_name

        q = inits[f"{safe_name(layer.weight)}_quantized"]
        assert q.dtype == np.int8 and q.min() >= -127
        assert layer.weight not in inits
    dq_axes = [a.i for n in qdq.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute]
    assert dq_axes and set(dq_axes) <= {0, 1}


def test_qdq_pairs_are_hoisted_over_maxpool_and_flatten(tmp_path):
    rng = np.random.default_rng(1)
    batches = [{"input": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)}]
    _, fp32, qdq, layers, sites, ranges = _quantize(SmallCNN(), batches[0]["input"][:1], tmp_path,
                                                    batches)
    producers = {o: n.op_type for n in fp32.graph.node for o in n.output}
    head = next(layer for layer in layers if layer.kind == "linear")
    # The head's input pair sits on the ReLU output, above MaxPool and Flatten.
    assert producers[sites[head.node]] == "Relu"
    assert ranges[sites[head.node]].non_negative
    ops = [n.op_type for n in qdq.graph.node]
    pool = len(ops) - 1 - ops[::-1].index("MaxPool")
    assert ops[pool - 1] == "DequantizeLinear" and ops[pool - 2] == "QuantizeLinear"


def test_transformer_linears_quantized_attention_style_inputs_signed(tmp_path):
    rng = np.random.default_rng(2)
    batches = [{"input": rng.standard_normal((4, 6, 32)).astype(np.float32)} for _ in range(3)]
    model = TinyEncoder()
    spec, fp32, qdq, layers, sites, ranges = _quantize(model, batches[0]["input"][:1], tmp_path,
                                                       batches)
    assert len(layers) == 3 and all(layer.kind == "linear" for layer in layers)
    # LayerNorm and GELU outputs take negative values: int8, never uint8.
    assert not any(ranges[sites[layer.node]].non_negative for layer in layers)
    test = {"input": rng.standard_normal((4, 6, 32)).astype(np.float32)}
    assert sqnr_db(torch_outputs(model, test, ["input"]),
                   qdq_arithmetic(tmp_path / "q.onnx", test)) > 25.0


def test_uint8_on_a_signed_tensor_is_refused(tmp_path):
    from deploycomp.errors import ExportError

    rng = np.random.default_rng(3)
    batches = [{"input": rng.standard_normal((4, 6, 32)).astype(np.float32)}]
    spec = ModelSpec("m", TinyEncoder().eval(), {"input": batches[0]["input"][:1]}, batches)
    fp32 = export_fp32(spec, tmp_path / "fp32.onnx")
    layers = [layer for layer in build_inventory(fp32, {"batch": 1}) if layer.eligible]
    sites = activation_sites(fp32, {layer.node for layer in layers})
    ranges = calibrate(fp32, list(sites.values()), batches, progress=False)
    with pytest.raises(ExportError, match="negative values"):
        insert_qdq(fp32, {layers[0].node: LayerQuant(layers[0], "uint8_per_tensor")}, ranges)


class ResidualBlock(nn.Module):
    """An inverted-residual block with explicit zero padding, as in EfficientNet-Lite."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.pad = nn.ZeroPad2d(1)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8)
        self.project = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        y = self.project(torch.nn.functional.relu6(self.depthwise(self.pad(h))))
        return self.head(h + y).mean(dim=(2, 3))


def test_residual_add_inputs_are_quantized_and_zero_pad_is_transparent(tmp_path):
    from deploycomp.export.qdq import residual_adds

    rng = np.random.default_rng(4)
    batches = [{"input": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    model = ResidualBlock().eval()
    spec = ModelSpec("m", model, {"input": batches[0]["input"][:1]}, batches)
    fp32 = export_fp32(spec, tmp_path / "fp32.onnx")
    layers = [layer for layer in build_inventory(fp32, {"batch": 1}) if layer.eligible]
    nodes = {layer.node for layer in layers}
    adds = residual_adds(fp32, nodes)
    assert [a.op_type for a in adds] == ["Add"]
    sites = activation_sites(fp32, nodes)
    producers = {o: n.op_type for n in fp32.graph.node for o in n.output}
    depthwise = next(layer for layer in layers if layer.kind == "conv2d_depthwise")
    # The depthwise conv's pair sits above the zero Pad, on the stem's output.
    assert producers[sites[depthwise.node]] != "Pad"
    tensors = list(dict.fromkeys([*sites.values(), *adds[0].input]))
    ranges = calibrate(fp32, tensors, batches, progress=False)
    plan = {layer.node: LayerQuant(layer, "int8_sym_per_tensor") for layer in layers}
    add_schemes = {adds[0].name: {t: "int8_sym_per_tensor" for t in adds[0].input}}
    qdq = insert_qdq(fp32, plan, ranges, add_schemes)
    onnx.checker.check_model(qdq)
    producers = {o: n.op_type for n in qdq.graph.node for o in n.output}
    add = next(n for n in qdq.graph.node if n.op_type == "Add")
    assert [producers[i] for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]
    onnx.save(qdq, tmp_path / "q.onnx")
    test = {"input": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)}
    assert sqnr_db(torch_outputs(model, test, ["input"]),
                   qdq_arithmetic(tmp_path / "q.onnx", test)) > 25.0
