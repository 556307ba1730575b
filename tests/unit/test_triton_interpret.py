"""The Triton kernels of kernels/ run through Triton's interpreter on CPU tensors, against their
references; the modules import and fail clearly without Triton; the fake-quant reference is the
project's fake quantizer.

Triton decides between compiling and interpreting when a kernel is decorated, that is when its
module is imported, and reads ``TRITON_INTERPRET`` then. The fixture below therefore loads private
copies of the kernel modules with the variable set and restores the environment at once: the
regular modules (imported by other tests, compiled on a GPU machine) are left untouched, whatever
ran before. This works even after triton was imported in compiled mode because the kernels call
only Triton builtins, not Triton's own @jit helpers. The interpreter checks the kernels' indexing, masking and arithmetic; only the GPU tests
(tests/gpu) check the compiled code.
"""

import importlib.util
import math
import sys
import types

import pytest
import torch
from torch import nn

from deploycomp.compress.fake_quant import _scale_gradient, lsq_fake_quantize
from deploycomp.compress.modules import CompressedLinear
from deploycomp.kernels import triton_fq24, triton_int4
from deploycomp.kernels.quantize import TINY_SCALE
from deploycomp.kernels.sparsity import mask_2_4

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _private_copy(module: types.ModuleType, prefix: str) -> types.ModuleType:
    """A fresh instance of ``module``, executed now (so with the current environment)."""
    spec = importlib.util.spec_from_file_location(f"{prefix}{module.__name__}", module.__file__)
    copy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = copy  # inspect.getsource, which Triton calls, looks modules up here
    spec.loader.exec_module(copy)
    return copy


@pytest.fixture(scope="module")
def interpreted():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "1")
        modules = types.SimpleNamespace(
            fq24=_private_copy(triton_fq24, "_interpreted_"),
            int4=_private_copy(triton_int4, "_interpreted_"),
        )
    assert modules.fq24._kernels_interpreted() and modules.int4._kernels_interpreted()
    yield modules
    for module in (modules.fq24, modules.int4):
        sys.modules.pop(module.__name__, None)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _weight_with_ties(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(n, k)
    w[0, :8] = torch.tensor([1.0, 1.0, -1.0, 1.0, 0.5, -2.0, 2.0, 2.0])  # ties, signs mixed
    w[1, :4] = 0.0  # an all-zero group keeps its first two
    return w.to(dtype)


# ---- fused 2:4 mask + fake quantization ---------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize(
    ("n", "k", "scales_per_row", "qmax"),
    [(16, 128, 1, 127), (37, 200, 1, 127), (20, 256, 8, 7), (5, 96, 3, 7)],
)
def test_fake_quant_2_4_is_bit_identical_to_its_reference(
    interpreted, n, k, scales_per_row, qmax, dtype
):
    w = _weight_with_ties(n, k, dtype)
    amax = w.float().abs().reshape(n, scales_per_row, -1).amax(-1)
    scale = (amax / qmax * 0.8).clamp(min=1e-6)  # 0.8: some weights clip
    got, got_mask = interpreted.fq24.fake_quant_2_4(w, scale.squeeze(1), qmax)
    want, want_mask = triton_fq24.fake_quant_2_4_reference(w, scale.squeeze(1), qmax)
    assert torch.equal(got_mask, want_mask)
    assert got.dtype == dtype and torch.equal(_bits(got), _bits(want))
    assert not got.isnan().any()
    # A given mask (one kept from an earlier step) is applied as is.
    stale = mask_2_4(torch.randn(n, k))
    got, mask = interpreted.fq24.fake_quant_2_4(w, scale.squeeze(1), qmax, stale)
    want, _ = triton_fq24.fake_quant_2_4_reference(w, scale.squeeze(1), qmax, stale)
    assert mask is stale and torch.equal(_bits(got), _bits(want))


@needs_triton
def test_fake_quant_2_4_masks_nan_and_inf_as_mask_2_4_does(interpreted):
    w = torch.randn(4, 16)
    w[0, :4] = torch.tensor([float("nan"), 1.0, float("inf"), 0.5])
    w[1, 4:8] = torch.tensor([float("inf"), float("inf"), float("inf"), 1.0])
    got, got_mask = interpreted.fq24.fake_quant_2_4(w, torch.full((4,), 0.01), 127)
    want, want_mask = triton_fq24.fake_quant_2_4_reference(w, torch.full((4,), 0.01), 127)
    assert torch.equal(got_mask, want_mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@needs_triton
@pytest.mark.parametrize(
    ("scheme", "dtype"),
    [
        ("int8_sym_per_channel", torch.float32),
        ("int4_sym_group16", torch.float32),
        ("int8_sym_per_channel", torch.bfloat16),
        ("int4_sym_group32", torch.float16),
    ],
)
def test_fused_autograd_function_matches_compressed_linear_bit_for_bit(interpreted, scheme, dtype):
    """What CompressedLinear runs on a GPU, compared with its unfused path on the same layer."""
    layer = CompressedLinear(nn.Linear(96, 20).to(dtype), weight=scheme, sparsity="2:4")
    with torch.no_grad():
        layer.weight.mul_(1.3)  # the mask buffer is now stale: it must be used, not recomputed
        layer.weight_quant.step.mul_(0.8)  # and some weights clip
    x = torch.randn(5, 96, dtype=dtype)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    want = [y.detach(), layer.weight.grad, layer.weight_quant.step.grad, layer.bias.grad]
    layer.zero_grad(set_to_none=True)

    quant = layer.weight_quant
    step = quant.step.reshape(quant.out_channels, quant.groups_per_channel, 1)
    grad_scale = 1.0 / math.sqrt(quant.elements_per_step * quant.qmax)
    positive_step = _scale_gradient(step.abs().clamp(min=TINY_SCALE), grad_scale)
    weight_q, _ = interpreted.fq24.fake_quant_2_4_ste(
        layer.weight, positive_step, quant.qmax, layer.mask, layer.sr_ste_decay
    )
    y = nn.functional.linear(x, weight_q, layer.bias)
    y.backward(grad_y)
    got = [y.detach(), layer.weight.grad, layer.weight_quant.step.grad, layer.bias.grad]
    for name, a, b in zip(("output", "weight grad", "step grad", "bias grad"), got, want):
        assert torch.equal(_bits(a), _bits(b)), name


def test_fake_quant_reference_is_the_projects_fake_quantizer():
    w = _weight_with_ties(12, 64, torch.float32)
    scale = w.abs().reshape(12, 4, 16).amax(-1) / 7 * 0.9
    got, mask = triton_fq24.fake_quant_2_4_reference(w, scale, 7)
    kept = torch.where(mask_2_4(w), w, w.new_zeros(())).reshape(12, 4, 16)
    want = lsq_fake_quantize(kept, scale.unsqueeze(-1), -7, 7, 1.0).reshape(12, 64)
    assert torch.equal(mask, mask_2_4(w)) and torch.equal(_bits(got), _bits(want))


# ---- INT4 weight-only GEMM ----------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    ("m", "n", "k", "group_size"),
    [
        (1, 48, 128, 32),  # one group per K tile
        (17, 40, 256, 64),  # a tile inside a group
        (5, 33, 80, 16),  # several groups per tile, K not a multiple of the tile
        (3, 24, 144, 48),  # groups straddle tiles
    ],
)
def test_int4_matmul_matches_its_reference(interpreted, m, n, k, group_size):
    # float16 only: the interpreter multiplies bfloat16 dot operands as their raw bit patterns
    # (integers), so bfloat16 is checked by the GPU tests alone.
    packed, scales = triton_int4.prepare_int4_weight(torch.randn(n, k), group_size, torch.float16)
    x = torch.randn(m, k).half()
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    y = interpreted.int4.int4_matmul(x, packed, scales, group_size, out=out)
    ref = triton_int4.int4_matmul_reference(x, packed, scales, group_size)
    assert y is out and not y.isnan().any()
    # fp16 weights and outputs: each rounds at 2^-11 relative, so about 5e-4 in all.
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-3


# ---- without a GPU, without Triton --------------------------------------------------------------


@needs_triton
def test_compiled_kernels_refuse_cpu_tensors_with_a_clear_error():
    if triton_fq24._kernels_interpreted():
        pytest.skip("TRITON_INTERPRET is set for the whole session")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        triton_fq24.fake_quant_2_4(torch.randn(4, 8), torch.ones(4), 127)
    packed, scales = triton_int4.prepare_int4_weight(torch.randn(4, 32), 32)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        triton_int4.int4_matmul(torch.randn(2, 32).half(), packed, scales, 32)


def test_modules_import_without_triton_and_say_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    fq24 = _private_copy(triton_fq24, "_without_triton_")
    int4 = _private_copy(triton_int4, "_without_triton_")
    try:
        with pytest.raises(RuntimeError, match="needs Triton"):
            fq24.fake_quant_2_4(torch.randn(4, 8), torch.ones(4), 127)
        packed, scales = int4.prepare_int4_weight(torch.randn(4, 32), 32)
        with pytest.raises(RuntimeError, match="needs Triton"):
            int4.int4_matmul(torch.randn(2, 32).half(), packed, scales, 32)
        wq, _ = fq24.fake_quant_2_4_reference(torch.randn(4, 8), torch.ones(4), 127)
        assert wq.shape == (4, 8)
    finally:
        sys.modules.pop(fq24.__name__, None)
        sys.modules.pop(int4.__name__, None)


def test_bad_arguments_are_rejected_before_any_kernel_runs():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        triton_fq24.fake_quant_2_4_reference(torch.randn(4, 6), torch.ones(4), 127)
    with pytest.raises(ValueError, match="qmax"):
        triton_fq24.fake_quant_2_4_reference(w, torch.ones(4), 0)
    with pytest.raises(ValueError, match="equal groups"):
        triton_fq24.fake_quant_2_4_reference(w, torch.ones(4, 3), 127)
    packed, scales = triton_int4.prepare_int4_weight(torch.randn(4, 32), 16)
    with pytest.raises(ValueError, match="scales must be"):
        triton_int4.int4_matmul_reference(torch.randn(2, 32).half(), packed, scales, 32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        triton_int4.int4_matmul_reference(torch.randn(2, 32), packed, scales, 16)
