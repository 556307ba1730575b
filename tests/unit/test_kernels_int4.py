"""INT4 group-wise numerics against their definitions: range, error bound, ONNX nibble layout."""

import pytest
import torch

from deploycomp.kernels.int4 import (
    dequantize_int4_groupwise,
    pack_int4,
    quantize_int4_groupwise,
    unpack_int4,
)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_range_scales_and_error_bound(group_size):
    # Rows with very different magnitudes, so a per-row scale would not pass the bound.
    w = torch.randn(6, 256) * torch.logspace(-3, 1, 256)
    q, scales = quantize_int4_groupwise(w, group_size)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scales.dtype == torch.float32 and scales.shape == (6, 256 // group_size)
    assert int(q.min()) >= -7 and int(q.max()) <= 7  # symmetric: -8 never produced
    groups = w.reshape(6, -1, group_size)
    torch.testing.assert_close(scales, groups.abs().amax(-1) / 7, rtol=1e-6, atol=0)
    # Each group's largest magnitude lands on +-7.
    assert (q.reshape(6, -1, group_size).abs().amax(-1) == 7).all()
    err = (dequantize_int4_groupwise(q, scales, group_size) - w).abs().reshape(6, -1, group_size)
    bound = scales.unsqueeze(-1) / 2
    assert (err <= bound * (1 + 1e-5)).all()


def test_quantize_is_odd_symmetric_and_rounds_half_to_even():
    w = torch.randn(4, 64)
    q_pos, s_pos = quantize_int4_groupwise(w, 32)
    q_neg, s_neg = quantize_int4_groupwise(-w, 32)
    assert torch.equal(q_neg, -q_pos) and torch.equal(s_neg, s_pos)
    # Scale 1 (max 7); 2.5 -> 2 and 3.5 -> 4 as in ONNX QuantizeLinear.
    q, _ = quantize_int4_groupwise(torch.tensor([[7.0, 2.5, 3.5, -0.5]]), 4)
    assert q.tolist() == [[7, 2, 4, 0]]


def test_all_zero_group_gets_a_tiny_positive_scale():
    w = torch.zeros(2, 64)
    w[1, 32:] = torch.randn(32)
    q, scales = quantize_int4_groupwise(w, 32)
    assert (scales > 0).all() and (q[0] == 0).all() and (q[1, :32] == 0).all()
    assert torch.equal(dequantize_int4_groupwise(q, scales, 32)[:, :32], torch.zeros(2, 32))


def test_half_precision_weight_keeps_float32_scales():
    w = torch.randn(2, 64, dtype=torch.float16)
    q, scales = quantize_int4_groupwise(w, 32)
    assert scales.dtype == torch.float32
    err = (dequantize_int4_groupwise(q, scales, 32) - w.float()).abs().reshape(2, 2, 32)
    assert (err <= scales.unsqueeze(-1) / 2 * (1 + 1e-5)).all()


def test_packed_nibble_layout_matches_onnx():
    # Element 0 in the low nibble, two's complement: 1 -> 0x1, -1 -> 0xF, so [1, -1] -> 0xF1.
    assert pack_int4(torch.tensor([1, -1], dtype=torch.int8)).tolist() == [0xF1]
    assert pack_int4(torch.tensor([-8, 7], dtype=torch.int8)).tolist() == [0x78]
    assert pack_int4(torch.tensor([[0, -2, 3, -8]], dtype=torch.int8)).tolist() == [[0xE0, 0x83]]
    # Row-wise packing with even rows is the flat layout ONNX writes for the whole tensor.
    q = torch.randint(-8, 8, (3, 10), dtype=torch.int8)
    assert torch.equal(pack_int4(q).flatten(), pack_int4(q.flatten()))


def test_pack_unpack_round_trip_covers_every_value():
    every = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.cartesian_prod(every, every).to(torch.int8).reshape(16, 32)  # all 256 pairs
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 16)
    assert sorted(packed.flatten().tolist()) == list(range(256))
    assert torch.equal(unpack_int4(packed, 32), q)
    # Through the quantizer too.
    w = torch.randn(4, 128)
    q, _ = quantize_int4_groupwise(w, 64)
    assert torch.equal(unpack_int4(pack_int4(q), 128), q)


def test_bad_shapes_and_values_are_errors():
    with pytest.raises(ValueError, match="not a multiple of group_size 32"):
        quantize_int4_groupwise(torch.randn(4, 48), 32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int4_groupwise(torch.randn(4, 2, 3, 3), 2)
    with pytest.raises(ValueError, match="positive int"):
        quantize_int4_groupwise(torch.randn(4, 64), 0)
    with pytest.raises(ValueError, match="floating-point"):
        quantize_int4_groupwise(torch.ones(4, 64, dtype=torch.int32), 32)
    q, scales = quantize_int4_groupwise(torch.randn(4, 64), 32)
    with pytest.raises(ValueError, match="scales shape"):
        dequantize_int4_groupwise(q, scales, 64)
    with pytest.raises(ValueError, match="even length"):
        pack_int4(torch.zeros(2, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8, 0], dtype=torch.int8))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="numel_last 7"):
        unpack_int4(torch.zeros(2, 4, dtype=torch.uint8), 7)
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(4, dtype=torch.int8), 8)
