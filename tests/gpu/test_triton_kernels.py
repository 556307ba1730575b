"""The compiled Triton kernels of kernels/ against their PyTorch references, on a CUDA GPU.

Every case draws fresh random inputs (never all zeros) and runs into memory poisoned beforehand
with 0xFF bytes (NaN in every float dtype), so an element a kernel fails to write cannot pass.

- Fused 2:4 mask + fake quantization: the mask must be identical and the output bit-identical.
  Every step is exactly rounded on both sides (IEEE division, the quotient rounded to the weight's
  dtype, rounding of a clamped value to an integer, one multiplication), so there is no ulp of
  slack to allow. The fused path of CompressedLinear must give the unfused path's output and
  gradients bit for bit, over several optimizer steps.
- INT4 GEMM: relative error ``|y - ref| / |ref|`` against the fp32 reference. The kernel rounds
  each dequantized weight to the activations' dtype before the tensor-core product and rounds the
  fp32 sum once at the end, so the error is a few units of that dtype's rounding: below 2e-3 for
  float16 (2^-11) and 1e-2 for bfloat16 (2^-8).
"""

import importlib.util

import pytest
import torch
from torch import nn

from deploycomp.compress.modules import CompressedLinear
from deploycomp.kernels.sparsity import mask_2_4
from deploycomp.kernels.triton_fq24 import (
    fake_quant_2_4,
    fake_quant_2_4_reference,
)
from deploycomp.kernels.triton_int4 import (
    int4_matmul,
    int4_matmul_reference,
    prepare_int4_weight,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None,
        reason="the kernels need Triton (it ships with CUDA builds of PyTorch)",
    ),
]

CUDA = "cuda"
INT4_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _poison_allocator(*shapes_dtypes: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Fill blocks of these sizes with 0xFF and free them: the caching allocator hands them out
    again to the next allocations of the same sizes, so unwritten outputs show up as NaN."""
    blocks = [torch.empty(shape, dtype=dtype, device=CUDA) for shape, dtype in shapes_dtypes]
    for block in blocks:
        block.view(torch.uint8).fill_(0xFF)
    torch.cuda.synchronize()
    del blocks


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


# ---- fused 2:4 mask + fake quantization ---------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize(
    ("n", "k", "scales_per_row", "qmax"),
    [
        (64, 128, 1, 127),
        (37, 200, 1, 127),  # rows and columns that leave partial tiles
        (768, 768, 1, 127),
        (3072, 768, 24, 7),  # INT4 groups of 32
        (101, 4100, 1025, 7),  # groups of 4
    ],
)
def test_fake_quant_2_4_is_bit_identical_to_its_reference(n, k, scales_per_row, qmax, dtype):
    w = torch.randn(n, k, device=CUDA)
    w[0, :8] = torch.tensor([1.0, 1.0, -1.0, 1.0, 0.5, -2.0, 2.0, 2.0])  # ties, signs mixed
    w[1, :4] = 0.0  # an all-zero group
    w = w.to(dtype)
    amax = w.float().abs().reshape(n, scales_per_row, -1).amax(-1)
    scale = (amax / qmax * 0.8).clamp(min=1e-6).squeeze(1)  # 0.8: some weights clip
    want, want_mask = fake_quant_2_4_reference(w, scale, qmax)
    assert torch.equal(want_mask, mask_2_4(w))

    _poison_allocator(((n, k), dtype), ((n, k), torch.bool))
    got, got_mask = fake_quant_2_4(w, scale, qmax)
    assert got_mask.view(torch.uint8).max() <= 1  # a bool written by the kernel, not 0xFF
    assert torch.equal(got_mask, want_mask)
    assert not got.isnan().any()
    assert torch.equal(_bits(got), _bits(want))

    stale = mask_2_4(torch.randn(n, k, device=CUDA))  # a given mask is applied, not recomputed
    want, _ = fake_quant_2_4_reference(w, scale, qmax, stale)
    _poison_allocator(((n, k), dtype))
    got, mask = fake_quant_2_4(w, scale, qmax, stale)
    assert mask is stale and torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize(
    ("scheme", "dtype"),
    [
        ("int8_sym_per_channel", torch.float32),
        ("int4_sym_group32", torch.float32),
        ("int4_sym_group128", torch.bfloat16),
        ("int8_sym_per_channel", torch.float16),
    ],
)
def test_compressed_linear_fused_path_matches_the_unfused_one_bit_for_bit(scheme, dtype):
    base = nn.Linear(256, 96).to(CUDA, dtype)
    fused = CompressedLinear(base, weight=scheme, activation="int8_sym_per_tensor", sparsity="2:4")
    plain = CompressedLinear(
        nn.Linear(256, 96).to(CUDA, dtype),
        weight=scheme,
        activation="int8_sym_per_tensor",
        sparsity="2:4",
    )
    plain.load_state_dict(fused.state_dict())
    fused.use_fused_kernel = True  # off by default until this test has passed on a GPU
    plain.use_fused_kernel = False
    assert fused._fused_kernel_applies() and not plain._fused_kernel_applies()
    optimizers = [torch.optim.SGD(layer.parameters(), lr=0.05) for layer in (fused, plain)]
    for step in range(4):
        x = torch.randn(8, 256, device=CUDA, dtype=dtype)
        grad_y = torch.randn(8, 96, device=CUDA, dtype=dtype)
        outputs = []
        for layer, optimizer in zip((fused, plain), optimizers):
            optimizer.zero_grad(set_to_none=True)
            y = layer.train()(x)
            y.backward(grad_y)
            outputs.append(y.detach())
        assert torch.equal(_bits(outputs[0]), _bits(outputs[1])), f"output, step {step}"
        for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
            assert torch.equal(_bits(a.grad), _bits(b.grad)), f"{name} grad, step {step}"
        for optimizer in optimizers:
            optimizer.step()
        if step == 1:  # the mask is recomputed between steps in training
            assert fused.update_mask() == plain.update_mask()


# ---- INT4 weight-only GEMM ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 7, 16, 33, 300])
@pytest.mark.parametrize(
    ("k", "n", "group_size"),
    [(768, 768, 128), (768, 3072, 64), (3072, 768, 32), (96, 100, 32), (192, 40, 48)],
)
def test_int4_matmul_matches_its_reference(m, k, n, group_size, dtype):
    packed, scales = prepare_int4_weight(torch.randn(n, k, device=CUDA), group_size, dtype)
    x = torch.randn(m, k, device=CUDA).to(dtype)
    ref = int4_matmul_reference(x, packed, scales, group_size)
    _poison_allocator(((m, n), dtype))
    y = int4_matmul(x, packed, scales, group_size)
    assert y.shape == (m, n) and y.dtype == dtype
    assert not y.isnan().any()
    assert _relative_error(y, ref) < INT4_TOLERANCE[dtype]


def test_int4_matmul_takes_strided_inputs_fp32_scales_and_an_out_buffer():
    packed, scales = prepare_int4_weight(torch.randn(512, 1024, device=CUDA), 128)  # fp32 scales
    x = torch.randn(1024, 24, device=CUDA).half().T  # [24, 1024], column-major
    out = torch.full((48, 512), float("nan"), device=CUDA, dtype=torch.float16)[::2]  # strided
    y = int4_matmul(x, packed, scales, 128, out=out)
    assert y is out and not out.isnan().any()
    ref = int4_matmul_reference(x, packed, scales, 128)
    assert _relative_error(y, ref) < INT4_TOLERANCE[torch.float16]
