"""Small seeded transformer-style models exported to fp32 and QDQ ONNX by the project's writer.

Shared by the CPU lowering tests (tests/backends/test_onnx_torch.py) and the GPU tests
(tests/gpu): an embedding, a LayerNorm, a GELU MLP with a residual, attention-style matmuls of
two activations, and a Gemm head, with every weight pruned 2:4 so the sparse kernels can run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from deploycomp.export.calibrate import calibrate, probe_session
from deploycomp.export.onnx_export import export_fp32
from deploycomp.export.qdq import LayerQuant, activation_sites, insert_qdq
from deploycomp.kernels.sparsity import apply_2_4
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.inventory import build_inventory

VOCAB, SEQ = 128, 16


class TinyEncoder(nn.Module):
    def __init__(self, hidden: int, ffn: int, classes: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + attn @ v
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.head(h[:, 0])


def export_encoder(root: Path, hidden: int, ffn: int, batch: int, schemes: dict[str, str]):
    """(fp32 path, {name: QDQ path}, test inputs): one QDQ file per scheme name in ``schemes``
    (``"int8"``: W8A8 with int8 activations on every linear; ``"int4"``: INT4 weight-only,
    group 32), weights pruned 2:4."""
    torch.manual_seed(0)
    model = TinyEncoder(hidden, ffn).eval()
    with torch.no_grad():
        for module in (model.qkv, model.up, model.down, model.head):
            module.weight.copy_(apply_2_4(module.weight))
    rng = np.random.default_rng(0)
    batches = [{"ids": rng.integers(0, VOCAB, (batch, SEQ)).astype(np.int64)} for _ in range(3)]
    spec = ModelSpec("encoder", model, {"ids": batches[0]["ids"][:1]}, batches[:2])
    fp32 = export_fp32(spec, root / "fp32.onnx")
    onnx.save(fp32, root / "fp32.onnx")
    layers = [la for la in build_inventory(fp32, {"batch": batch}) if la.kind == "linear"]
    sites = activation_sites(fp32, {la.node for la in layers})
    ranges = calibrate(fp32, list(set(sites.values())), batches[:2], progress=False)
    paths = {}
    for name, scheme in schemes.items():
        if scheme == "int8":
            plan = {la.node: LayerQuant(la, "int8_sym_per_tensor") for la in layers}
        else:
            plan = {la.node: LayerQuant(la, "fp32", "int4_sym_group32") for la in layers}
        paths[name] = root / f"{name}.onnx"
        onnx.save(insert_qdq(fp32, plan, ranges), paths[name])
    return root / "fp32.onnx", paths, batches[2]


def ort_reference(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of ONNX Runtime with graph optimizations off: the graph's own semantics
    (with them on, it fuses INT4 DequantizeLinear + MatMul into a kernel that quantizes
    activations)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def qdq_arithmetic(path, batch) -> np.ndarray:
    """The QDQ graph's own arithmetic on ``batch``: every DequantizeLinear, operator and
    QuantizeLinear run as written, in float (no fused integer kernel, whose rounding differs and
    which saturates on x86 CPUs without VNNI)."""
    return probe_session(onnx.load(str(path))).run(None, batch)[0]
