"""The QDQ writer's weight storage: learned scales, INT4 blocks, embeddings, 2:4 zeros, opset 21."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deploycomp.errors import ExportError
from deploycomp.export.calibrate import calibrate
from deploycomp.export.check import ort_runner
from deploycomp.export.onnx_export import export_fp32
from deploycomp.export.opset import bump_opset, default_opset, upgrade_opset
from deploycomp.export.qdq import LayerQuant, activation_sites, insert_qdq, safe_name
from deploycomp.kernels.int4 import quantize_int4_groupwise
from deploycomp.kernels.sparsity import mask_2_4
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.inventory import Layer, build_inventory

VOCAB, HIDDEN, FFN, CLASSES, SEQ = 50, 64, 128, 8, 5


class TinyText(nn.Module):
    """Embedding, a residual MLP on [batch, seq, hidden] (MatMul), a head on the mean (Gemm)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h.mean(dim=1))


def on_grid(rows: int, cols: int, qmax: int, group: int | None, seed: int):
    """A weight ``q * s`` (torch layout) with integer ``q`` and a scale that is not max-abs."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-qmax, qmax + 1, (rows, cols)).astype(np.int8)
    q[:, 0] = qmax // 2  # some rows/groups never reach qmax: max-abs would pick another scale
    per = cols if group is None else group
    s = (rng.random((rows, cols // per)) * 0.02 + 0.005).astype(np.float32)
    w = q.astype(np.float32) * np.repeat(s, per, axis=1)
    return w, q, (s[:, 0] if group is None else s)


def export_text_model(tmp_path, model=None):
    model = (model or TinyText()).eval()
    rng = np.random.default_rng(0)
    batches = [{"ids": rng.integers(0, VOCAB, (4, SEQ)).astype(np.int64)} for _ in range(2)]
    spec = ModelSpec("text", model, {"ids": batches[0]["ids"][:1]}, batches)
    fp32 = export_fp32(spec, tmp_path / "fp32.onnx")
    return model, fp32, batches


def embedding_layer(model: onnx.ModelProto) -> Layer:
    (layer,) = (la for la in build_inventory(model, {"batch": 1}) if la.kind == "embedding")
    return layer


def layers_by_name(fp32):
    layers = {la.name: la for la in build_inventory(fp32, {"batch": 1}) if la.kind == "linear"}
    return layers["up"], layers["down"], layers["head"]


def initializer(model, name) -> np.ndarray:
    init = next(i for i in model.graph.initializer if i.name == name)
    return numpy_helper.to_array(init)


def dq_of(model, weight_name):
    return next(
        n for n in model.graph.node if n.name == f"{safe_name(weight_name)}_DequantizeLinear"
    )


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# -- kernel --------------------------------------------------------------------------------------


def test_int4_kernel_takes_learned_scales_and_returns_the_codes():
    w, q, s = on_grid(6, 64, 7, 16, seed=1)
    codes, scales = quantize_int4_groupwise(torch.from_numpy(w), 16, torch.from_numpy(s))
    np.testing.assert_array_equal(codes.numpy(), q)
    np.testing.assert_array_equal(scales.numpy(), s)
    # Computed scales differ (rows where q never reaches 7), which is why learned ones are passed.
    assert not np.array_equal(quantize_int4_groupwise(torch.from_numpy(w), 16)[1].numpy(), s)
    # Beyond 7 * scale clips, as the fake quantizer that learned the scale does.
    clipped, _ = quantize_int4_groupwise(torch.from_numpy(w * 3), 16, torch.from_numpy(s))
    assert clipped.abs().max() == 7
    with pytest.raises(ValueError, match=r"expected \(6, 4\)"):
        quantize_int4_groupwise(torch.from_numpy(w), 16, torch.from_numpy(s[:, :2]))
    with pytest.raises(ValueError, match="positive and finite"):
        quantize_int4_groupwise(torch.from_numpy(w), 16, torch.from_numpy(-s))


# -- learned scales, layouts ---------------------------------------------------------------------


def test_learned_scales_export_bit_exactly_in_matmul_and_gemm_layouts(tmp_path):
    model = TinyText().eval()
    up_w, up_q, up_s = on_grid(FFN, HIDDEN, 7, 32, seed=2)  # int4, MatMul [K, N]
    down_w, down_q, down_s = on_grid(HIDDEN, FFN, 127, None, seed=3)  # int8 w-only, MatMul
    head_w, head_q, head_s = on_grid(CLASSES, HIDDEN, 7, 16, seed=4)  # int4, Gemm transB=1
    with torch.no_grad():
        for linear, w in ((model.up, up_w), (model.down, down_w), (model.head, head_w)):
            linear.weight.copy_(torch.from_numpy(w))
    _, fp32, _ = export_text_model(tmp_path, model)
    up, down, head = layers_by_name(fp32)
    assert (up.op_type, down.op_type, head.op_type) == ("MatMul", "MatMul", "Gemm")
    plan = {
        up.node: LayerQuant(up, "fp32", "int4_sym_group32", up_s),
        down.node: LayerQuant(down, "fp32", "int8_sym_per_channel", down_s),
        head.node: LayerQuant(head, "fp32", "int4_sym_group16", head_s),
    }
    qdq = insert_qdq(fp32, plan, {})
    onnx.checker.check_model(qdq, full_check=True)
    assert default_opset(qdq) == 21
    # MatMul weights are [K, N]: codes and scales are the torch ones transposed.
    up_codes = initializer(qdq, f"{safe_name(up.weight)}_quantized")
    assert up_codes.dtype.name == "int4" and up_codes.shape == (HIDDEN, FFN)
    np.testing.assert_array_equal(up_codes.astype(np.int8), up_q.T)
    np.testing.assert_array_equal(initializer(qdq, f"{safe_name(up.weight)}_scale"), up_s.T)
    assert attrs(dq_of(qdq, up.weight)) == {"axis": 0, "block_size": 32}
    np.testing.assert_array_equal(initializer(qdq, f"{safe_name(down.weight)}_quantized"), down_q.T)
    np.testing.assert_array_equal(initializer(qdq, f"{safe_name(down.weight)}_scale"), down_s)
    assert attrs(dq_of(qdq, down.weight)) == {"axis": 1}
    # The INT4 Gemm is written as MatMul + Add with its [N, K] weight transposed to [K, N].
    head_codes = initializer(qdq, f"{safe_name(head.weight)}_quantized").astype(np.int8)
    np.testing.assert_array_equal(head_codes, head_q.T)
    np.testing.assert_array_equal(initializer(qdq, f"{safe_name(head.weight)}_scale"), head_s.T)
    ops = {n.name: n.op_type for n in qdq.graph.node}
    assert ops[head.node] == "MatMul" and ops[f"{head.node}_bias_Add"] == "Add"
    assert "Gemm" not in ops.values() and "QuantizeLinear" not in ops.values()


def test_gemm_with_quantized_input_keeps_its_layout_and_int32_bias(tmp_path):
    model = TinyText().eval()
    head_w, head_q, head_s = on_grid(CLASSES, HIDDEN, 127, None, seed=5)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(head_w))
    _, fp32, batches = export_text_model(tmp_path, model)
    _, _, head = layers_by_name(fp32)
    sites = activation_sites(fp32, {head.node})
    ranges = calibrate(fp32, list(sites.values()), batches, progress=False)
    plan = {head.node: LayerQuant(head, "int8_sym_per_tensor", weight_scale=head_s)}
    qdq = insert_qdq(fp32, plan, ranges)
    assert default_opset(qdq) == 17  # no INT4: the graph keeps its opset
    gemm = next(n for n in qdq.graph.node if n.op_type == "Gemm")
    np.testing.assert_array_equal(initializer(qdq, f"{safe_name(head.weight)}_quantized"), head_q)
    assert attrs(dq_of(qdq, head.weight)) == {"axis": 0}
    bias = initializer(qdq, gemm.input[2].replace("_dequantized", "_quantized"))
    assert bias.dtype == np.int32


def test_wrong_scales_and_schemes_are_refused_with_the_expected_layout(tmp_path):
    _, fp32, _ = export_text_model(tmp_path)
    up, _, head = layers_by_name(fp32)
    with pytest.raises(ExportError, match=r"expected \(128, 2\)"):
        insert_qdq(
            fp32, {up.node: LayerQuant(up, "fp32", "int4_sym_group32", np.ones((2, 128)))}, {}
        )
    with pytest.raises(ExportError, match="positive and finite"):
        insert_qdq(fp32, {up.node: LayerQuant(up, "fp32", weight_scale=np.zeros(FFN))}, {})
    with pytest.raises(ExportError, match="multiple of 48"):
        insert_qdq(fp32, {up.node: LayerQuant(up, "fp32", "int4_sym_group48")}, {})
    with pytest.raises(ExportError, match="unknown weight quantization scheme"):
        LayerQuant(head, "fp32", "int3_sym")
    with pytest.raises(ExportError, match="unknown activation scheme"):
        LayerQuant(head, "bf16")


def test_int4_convolution_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    x = np.zeros((1, 3, 6, 6), np.float32)
    fp32 = export_fp32(ModelSpec("cnn", model, {"x": x}, [{"x": x}]), tmp_path / "cnn.onnx")
    conv = next(la for la in build_inventory(fp32, {"batch": 1}) if la.op_type == "Conv")
    with pytest.raises(ExportError, match="no backend runs INT4 convolutions"):
        insert_qdq(fp32, {conv.node: LayerQuant(conv, "fp32", "int4_sym_group27")}, {})


# -- embeddings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8_sym_per_channel", "int4_sym_group32"])
def test_embedding_table_is_quantized_per_row_or_in_blocks_along_hidden(tmp_path, scheme):
    model, fp32, batches = export_text_model(tmp_path)
    embed = embedding_layer(fp32)
    qdq = insert_qdq(fp32, {embed.node: LayerQuant(embed, "fp32", scheme)}, {})
    onnx.checker.check_model(qdq, full_check=True)
    codes = initializer(qdq, f"{safe_name(embed.weight)}_quantized").astype(np.int8)
    scale = initializer(qdq, f"{safe_name(embed.weight)}_scale")
    table = model.embed.weight.detach().numpy()
    if scheme.startswith("int8"):
        assert attrs(dq_of(qdq, embed.weight)) == {"axis": 0} and scale.shape == (VOCAB,)
        dequantized = codes * scale[:, None]
    else:
        assert attrs(dq_of(qdq, embed.weight)) == {"axis": 1, "block_size": 32}
        assert scale.shape == (VOCAB, HIDDEN // 32)
        dequantized = codes * np.repeat(scale, 32, axis=1)
    qmax = 127 if scheme.startswith("int8") else 7
    assert np.abs(dequantized - table).max() <= np.abs(table).max() / qmax / 2 + 1e-7
    assert embed.weight not in {i.name for i in qdq.graph.initializer}  # no fp32 copy left
    gather = next(n for n in qdq.graph.node if n.op_type == "Gather" and n.name == embed.node)
    assert gather.input[0] == f"{safe_name(embed.weight)}_dequantized"
    # The rest of the graph is fp32: the Gather output must equal a lookup in the table.
    path = tmp_path / "q.onnx"
    onnx.save(qdq, path)
    with torch.no_grad():
        model.embed.weight.copy_(torch.from_numpy(dequantized.astype(np.float32)))
        expected = model(torch.from_numpy(batches[1]["ids"])).numpy()
    np.testing.assert_allclose(ort_runner(str(path))(batches[1]), expected, rtol=0, atol=1e-5)


def test_embedding_with_a_quantized_input_is_refused(tmp_path):
    _, fp32, _ = export_text_model(tmp_path)
    embed = embedding_layer(fp32)
    with pytest.raises(ExportError, match="integer indices"):
        insert_qdq(fp32, {embed.node: LayerQuant(embed, "int8_sym_per_tensor")}, {})


# -- 2:4 zeros -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8_sym_per_channel", "int4_sym_group16"])
def test_2_4_zeros_stay_exactly_zero(tmp_path, scheme):
    model = TinyText().eval()
    rng = np.random.default_rng(6)
    # Magnitudes in [0.5, 1] per row: every kept weight is at least half its group's max, so only
    # the pruned ones can quantize to 0.
    magnitude = rng.uniform(0.5, 1.0, (FFN, HIDDEN)) * rng.choice([-1.0, 1.0], (FFN, HIDDEN))
    weight = torch.from_numpy(magnitude.astype(np.float32))
    mask = mask_2_4(weight)
    with torch.no_grad():
        model.up.weight.copy_(weight * mask)
    _, fp32, _ = export_text_model(tmp_path, model)
    up, _, _ = layers_by_name(fp32)
    qdq = insert_qdq(fp32, {up.node: LayerQuant(up, "fp32", scheme)}, {})
    codes = initializer(qdq, f"{safe_name(up.weight)}_quantized").astype(np.int8).T  # [out, in]
    np.testing.assert_array_equal(codes == 0, ~mask.numpy())


# -- opset ---------------------------------------------------------------------------------------


def test_upgrade_to_opset_21_keeps_outputs_and_node_names(tmp_path):
    _, fp32, batches = export_text_model(tmp_path)
    upgraded = upgrade_opset(fp32, 21)
    onnx.checker.check_model(upgraded, full_check=True)
    assert default_opset(upgraded) == 21 and default_opset(fp32) == 17
    assert {n.name for n in fp32.graph.node} <= {n.name for n in upgraded.graph.node}
    assert all(n.name for n in upgraded.graph.node)
    mean = next(n for n in upgraded.graph.node if n.op_type == "ReduceMean")
    assert len(mean.input) == 2  # axes moved from an attribute to an input at opset 18
    onnx.save(upgraded, tmp_path / "fp32_21.onnx")
    for batch in batches:
        np.testing.assert_array_equal(
            ort_runner(str(tmp_path / "fp32_21.onnx"))(batch),
            ort_runner(str(tmp_path / "fp32.onnx"))(batch),
        )


def test_manual_bump_rewrites_the_ops_whose_meaning_changed(tmp_path):
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], name="mean", axes=[1], keepdims=1),
        helper.make_node("ReduceMax", ["x"], ["max"], name="max", axes=[2], keepdims=0),
        helper.make_node("Split", ["x"], ["a", "b"], name="split", axis=2),
        helper.make_node("Unsqueeze", ["max", "two"], ["max3"], name="unsqueeze"),
        helper.make_node("Add", ["mean", "max3"], ["sum"], name="add"),
        helper.make_node("Concat", ["sum", "a", "b"], ["y"], name="concat", axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])],
        [numpy_helper.from_array(np.array([2], np.int64), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    bumped = bump_opset(model, 21)
    onnx.checker.check_model(bumped, full_check=True)
    by_name = {n.name: n for n in bumped.graph.node}
    assert len(by_name["mean"].input) == 2 and "axes" not in attrs(by_name["mean"])
    assert attrs(by_name["split"])["num_outputs"] == 2
    onnx.save(model, tmp_path / "m17.onnx")
    onnx.save(bumped, tmp_path / "m21.onnx")
    x = {"x": np.random.default_rng(7).standard_normal((2, 3, 4)).astype(np.float32)}
    np.testing.assert_array_equal(
        ort_runner(str(tmp_path / "m21.onnx"))(x), ort_runner(str(tmp_path / "m17.onnx"))(x)
    )
    old = onnx.ModelProto()
    old.CopyFrom(model)
    old.opset_import[0].version = 11
    with pytest.raises(ExportError, match="opset 13 to 21"):
        bump_opset(old, 21)


class TwoReaders(nn.Module):
    """Two linears reading one tensor: one with a quantized input, one weight-only."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(HIDDEN, HIDDEN)
        self.b = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        h = torch.relu(x)
        return self.a(h) + self.b(h)


def test_weight_only_layer_reads_the_float_tensor_beside_a_quantized_reader(tmp_path):
    rng = np.random.default_rng(8)
    batches = [{"x": rng.standard_normal((4, HIDDEN)).astype(np.float32)}]
    spec = ModelSpec("two", TwoReaders().eval(), {"x": batches[0]["x"][:1]}, batches)
    fp32 = export_fp32(spec, tmp_path / "two.onnx")
    a, b = (la for la in build_inventory(fp32, {"batch": 1}) if la.kind == "linear")
    sites = activation_sites(fp32, {a.node})
    ranges = calibrate(fp32, list(sites.values()), batches, progress=False)
    plan = {
        a.node: LayerQuant(a, "uint8_per_tensor"),
        b.node: LayerQuant(b, "fp32", "int4_sym_group16"),
    }
    qdq = insert_qdq(fp32, plan, ranges)
    onnx.checker.check_model(qdq, full_check=True)
    by_name = {n.name: n for n in qdq.graph.node}
    assert by_name[a.node].input[0] == f"{safe_name(sites[a.node])}_dequantized"
    assert by_name[b.node].input[0] == sites[a.node]  # the float ReLU output
    assert [n.op_type for n in qdq.graph.node].count("QuantizeLinear") == 1


def test_int4_weight_of_odd_size_is_packed_with_a_pad_nibble(tmp_path):
    model = nn.Linear(3, 5).eval()  # Gemm weight [5, 3]: 15 values, an odd count
    x = np.random.default_rng(9).standard_normal((2, 3)).astype(np.float32)
    fp32 = export_fp32(ModelSpec("odd", model, {"x": x[:1]}, [{"x": x}]), tmp_path / "odd.onnx")
    (layer,) = build_inventory(fp32, {"batch": 1})
    qdq = insert_qdq(fp32, {layer.node: LayerQuant(layer, "fp32", "int4_sym_group3")}, {})
    onnx.checker.check_model(qdq, full_check=True)
    init = next(
        i for i in qdq.graph.initializer if i.name == f"{safe_name(layer.weight)}_quantized"
    )
    assert len(init.raw_data) == 8
    codes, scales = quantize_int4_groupwise(model.weight.detach(), 3)
    np.testing.assert_array_equal(numpy_helper.to_array(init).astype(np.int8), codes.numpy().T)
    onnx.save(qdq, tmp_path / "q.onnx")
    dequantized = (codes.float() * scales.repeat_interleave(3, dim=1)).numpy()
    expected = x @ dequantized.T + model.bias.detach().numpy()
    np.testing.assert_allclose(ort_runner(str(tmp_path / "q.onnx"))({"x": x}), expected, atol=1e-5)
