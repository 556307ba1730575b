"""The onnxruntime lowerer runs quantized embedding lookups as GatherBlockQuantized, exactly.

A table exported as ``DequantizeLinear -> Gather`` (INT4 blocked along the hidden axis, or int8
with one scale per row) becomes one ``com.microsoft.GatherBlockQuantized`` node in the engine,
which dequantizes only the gathered rows. The values are the same, so the engine's outputs match
the QDQ model run unfused in a plain session. Hand-built graphs cover zero points, an odd hidden
size, and the lookups the rewrite must leave alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deploycomp.backends import BuildConfig, get_backend
from deploycomp.backends.onnxruntime import ENGINE_FILE, gather_block_quantized
from deploycomp.export.onnx_export import export_fp32
from deploycomp.export.qdq import LayerQuant, insert_qdq
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.inventory import build_inventory

VOCAB, HIDDEN, CLASSES, SEQ = 1000, 256, 16, 24
ATOL = 1e-6  # same dequantized values on both sides (measured: bit-identical)
SCHEMES = {"int4_sym_group128": 4, "int8_sym_per_channel": 8}


class EmbedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def _plain_run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(dir, fp32 model, its embedding layer, test ids): the table is the only quantized layer."""
    root = tmp_path_factory.mktemp("gather")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batches = [{"ids": rng.integers(0, VOCAB, (4, SEQ)).astype(np.int64)} for _ in range(2)]
    spec = ModelSpec("embed", EmbedLinear().eval(), {"ids": batches[0]["ids"][:1]}, batches[:1])
    fp32 = export_fp32(spec, root / "fp32.onnx")
    embed = next(la for la in build_inventory(fp32, {"batch": 1}) if la.kind == "embedding")
    test = batches[1]["ids"].copy()
    test[0, :2] = (0, VOCAB - 1)  # the first and last rows
    return root, fp32, embed, {"ids": test}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_engine_gathers_quantized_rows_and_matches_the_qdq_model(exported, scheme):
    root, fp32, embed, test = exported
    qdq_path = root / f"{scheme}.onnx"
    onnx.save(insert_qdq(fp32, {embed.node: LayerQuant(embed, "fp32", scheme)}, {}), qdq_path)
    backend = get_backend("onnxruntime")
    engine = backend.build(qdq_path, root / scheme, BuildConfig(threads=1))
    optimized = onnx.load(str(root / scheme / ENGINE_FILE))
    lookups = [n for n in optimized.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookups) == 1 and lookups[0].domain == "com.microsoft"
    attrs = {a.name: helper.get_attribute_value(a) for a in lookups[0].attribute}
    assert attrs["bits"] == SCHEMES[scheme]
    assert "DequantizeLinear" not in {n.op_type for n in optimized.graph.node}
    assert any("GatherBlockQuantized" in note for note in engine.notes)
    (logits,) = backend.load(engine).run(test)
    np.testing.assert_allclose(logits, _plain_run(str(qdq_path), test), rtol=0, atol=ATOL)


def _lookup_graph(
    bits: int, hidden: int, with_zero_point: bool, second_reader: str | None = None
) -> onnx.ModelProto:
    """``DequantizeLinear(table) -> Gather(ids)`` on a random table, as the exporter lays it out
    (int8: axis 0, one scale per row; INT4: axis 1, blocks of 32), optionally with a
    non-zero zero point and a second node reading the dequantized table."""
    rng = np.random.default_rng(bits + hidden)
    vocab, block = 50, 32
    q = rng.integers(-8 if bits == 4 else -127, 8 if bits == 4 else 128, (vocab, hidden))
    if bits == 8:
        scale_shape, dq_attrs, dtype = [vocab], {"axis": 0}, TensorProto.INT8
    else:
        scale_shape, dtype = [vocab, -(-hidden // block)], TensorProto.INT4
        dq_attrs = {"axis": 1, "block_size": block}
    scale = rng.uniform(0.01, 0.1, scale_shape).astype(np.float32)
    inits = [
        helper.make_tensor("table", dtype, [vocab, hidden], q.flatten().tolist()),
        numpy_helper.from_array(scale, "scale"),
    ]
    if with_zero_point:
        zp = rng.integers(-8 if bits == 4 else -128, 8 if bits == 4 else 128, scale_shape)
        inits.append(helper.make_tensor("zero_point", dtype, scale_shape, zp.flatten().tolist()))
    dq_inputs = [i.name for i in inits]
    nodes = [
        helper.make_node("DequantizeLinear", dq_inputs, ["table_dq"], name="dq", **dq_attrs),
        helper.make_node("Gather", ["table_dq", "ids"], ["rows"], name="lookup", axis=0),
    ]
    outputs = [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, hidden])]
    if second_reader == "ReduceSum":  # e.g. a tied output projection reading the whole table
        nodes.append(helper.make_node("ReduceSum", ["table_dq"], ["total"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    graph = helper.make_graph(
        nodes,
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("with_zero_point", [False, True])
@pytest.mark.parametrize(("bits", "hidden"), [(4, 64), (4, 80), (8, 64), (8, 40)])
def test_rewrite_is_exact_on_every_row(bits, hidden, with_zero_point):
    model = _lookup_graph(bits, hidden, with_zero_point)
    onnx.checker.check_model(model, full_check=True)
    every_row = {"ids": np.concatenate([np.arange(50), [-1, 7, 7]]).astype(np.int64)}
    before = _plain_run(model, every_row)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert gather_block_quantized(rewritten) == 1
    onnx.checker.check_model(rewritten)
    assert [n.op_type for n in rewritten.graph.node] == ["GatherBlockQuantized"]
    # The signed table and its scales' original layout are gone from the graph.
    assert {i.data_type for i in rewritten.graph.initializer} <= {
        TensorProto.UINT8,
        TensorProto.FLOAT,
    }
    np.testing.assert_allclose(_plain_run(rewritten, every_row), before, rtol=0, atol=ATOL)


def test_lookups_the_op_cannot_take_are_left_alone():
    shared = _lookup_graph(8, 64, with_zero_point=False, second_reader="ReduceSum")
    other_axis = _lookup_graph(8, 64, with_zero_point=False)
    other_axis.graph.node[1].attribute[0].i = 1  # gathers columns, not rows
    per_tensor = _lookup_graph(8, 64, with_zero_point=False)
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "scale")
    per_tensor.graph.initializer[1].CopyFrom(scale)
    for model in (shared, other_axis, per_tensor):
        before = model.SerializeToString()
        assert gather_block_quantized(model) == 0
        assert model.SerializeToString() == before
