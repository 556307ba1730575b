"""The ONNX-to-PyTorch lowering of the torch backend, run on the CPU in fp32 against ONNX Runtime.

On the CPU every linear layer runs its dense kernel (int8 through torch._int_mm, which has a CPU
kernel; INT4 and float dequantized), so the lowered program must compute what ONNX Runtime
computes from the same QDQ graph, up to float rounding and ONNX Runtime's own int8 kernels.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from _qdq_models import export_encoder, ort_reference

from deploycomp.backends.onnx_torch import OPS, lower, run_numpy
from deploycomp.errors import BackendError


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return export_encoder(
        tmp_path_factory.mktemp("enc"), 64, 256, 4, {"int8": "int8", "int4": "int4"}
    )


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_fp32_graph_matches_onnxruntime(encoder):
    fp32, _, test = encoder
    program = lower(onnx.load(str(fp32)))
    assert {op.kernel for op in program.linears.values()} == {"float"}
    assert len(program.linears) == 4  # qkv, up, down, head: each a fused linear with its bias
    assert _rel(run_numpy(program, test)[0], ort_reference(fp32, test)) < 1e-5


def test_w8a8_graph_runs_int8_gemms_and_matches_onnxruntime(encoder):
    _, paths, test = encoder
    program = lower(onnx.load(str(paths["int8"])))
    kernels = {op.kernel for op in program.linears.values()}
    assert kernels == {"int8"}, kernels
    assert all(op.act is not None and op.act[2] == torch.int8 for op in program.linears.values())
    assert _rel(run_numpy(program, test)[0], ort_reference(paths["int8"], test)) < 1e-3


def test_int4_graph_matches_onnxruntime(encoder):
    _, paths, test = encoder
    program = lower(onnx.load(str(paths["int4"])))
    assert all(op.q4 is not None and op.int4_group == 32 for op in program.linears.values())
    assert _rel(run_numpy(program, test)[0], ort_reference(paths["int4"], test)) < 1e-5


def test_quantized_input_is_folded_into_the_linear(encoder):
    _, paths, _ = encoder
    program = lower(onnx.load(str(paths["int8"])))
    ops = [step.op_type for step in program.steps]
    # the activation Q/DQ pairs of the linears are inside the LinearOps, not separate steps
    assert "QuantizeLinear" not in ops, ops


def test_specialized_program_keeps_only_device_work(encoder):
    fp32, _, test = encoder
    program = lower(onnx.load(str(fp32)))
    spec = program.specialize({"ids": torch.from_numpy(test["ids"])})
    ops = {step.op_type for step in spec.steps}
    assert not ops & {"Shape", "Constant", "ConstantOfShape"}, ops


def test_unsupported_op_is_a_clear_error():
    node = onnx.helper.make_node("NonMaxSuppression", ["x"], ["y"], name="nms")
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [1])],
    )
    with pytest.raises(BackendError, match="NonMaxSuppression.*onnxruntime backend"):
        lower(onnx.helper.make_model(graph))
    assert "NonMaxSuppression" not in OPS


@pytest.mark.zoo
@pytest.mark.slow
def test_minilm_graph_matches_onnxruntime(tmp_path):
    from deploycomp.export.onnx_export import export_fp32
    from deploycomp.plan.inventory import build_inventory
    from deploycomp.zoo import load as load_model

    spec = load_model("minilm-l6")
    path = tmp_path / "minilm.onnx"
    export_fp32(spec, path)
    batch = {k: v[:4] for k, v in spec.example_inputs.items()}
    model = onnx.load(str(path))
    program = lower(model)
    inventory = build_inventory(model, {"batch": 4})
    assert {op.name for op in program.linears.values()} == {
        la.node for la in inventory if la.kind == "linear"
    }
    assert _rel(run_numpy(program, batch)[0], ort_reference(path, batch)) < 1e-4
