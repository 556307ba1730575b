"""2:4 sparsity numerics against their definitions: brute-force masks, storage, SR-STE gradient."""

import itertools

import pytest
import torch

from deploycomp.kernels.sparsity import (
    apply_2_4,
    compress_2_4,
    decompress_2_4,
    is_2_4_sparse,
    mask_2_4,
    sr_ste,
)


def _brute_force_mask(rows: list[list[float]]) -> list[list[bool]]:
    """Per group of 4, the pair of positions with the largest |w| sum, first such pair on a tie."""
    mask = []
    for row in rows:
        kept = []
        for start in range(0, len(row), 4):
            group = [abs(v) for v in row[start : start + 4]]
            # Sorting by (-|w|, index) and taking two is the definition: largest, lower index wins.
            order = sorted(range(4), key=lambda i: (-group[i], i))
            kept += [i in order[:2] for i in range(4)]
        mask.append(kept)
    return mask


def test_mask_keeps_the_two_largest_magnitudes_of_every_group():
    w = torch.randn(6, 16)
    mask = mask_2_4(w)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert (mask.reshape(6, 4, 4).sum(-1) == 2).all()
    assert mask.tolist() == _brute_force_mask(w.tolist())
    kept = w.abs()[mask].reshape(6, 4, 2).amin(-1)
    dropped = w.abs()[~mask].reshape(6, 4, 2).amax(-1)
    assert (kept >= dropped).all()


def test_ties_keep_the_lower_index():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, -2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    assert mask_2_4(w).tolist() == [
        [True, True, False, False, False, True, True, False, True, True, False, False]
    ]
    # Every pattern of tied magnitudes on a small grid, signs included.
    for values in itertools.product([0.0, 1.0, -1.0, 2.0], repeat=4):
        row = [list(values)]
        assert mask_2_4(torch.tensor(row)).tolist() == _brute_force_mask(row)


def test_conv_weight_groups_run_along_the_flattened_reduction_axis():
    # kh * kw = 9, so groups of 4 straddle input channels: the layout is the flattened axis.
    w = torch.randn(8, 4, 3, 3)
    mask = mask_2_4(w)
    assert mask.shape == w.shape
    assert mask.flatten(1).tolist() == _brute_force_mask(w.flatten(1).tolist())
    assert (mask.reshape(8, 9, 4).sum(-1) == 2).all()
    assert is_2_4_sparse(apply_2_4(w)) and not is_2_4_sparse(w)


def test_apply_and_is_sparse():
    w = torch.randn(4, 8)
    pruned = apply_2_4(w)
    assert torch.equal(pruned, torch.where(mask_2_4(w), w, 0.0))
    assert is_2_4_sparse(pruned)
    assert torch.equal(apply_2_4(pruned), pruned)  # idempotent
    assert is_2_4_sparse(torch.zeros(2, 4))
    assert not is_2_4_sparse(torch.ones(2, 4))
    assert not is_2_4_sparse(torch.zeros(2, 6))  # no groups of 4: cannot be 2:4
    assert not torch.signbit(apply_2_4(torch.tensor([[-1.0, 5.0, 4.0, -0.5]]))).any()


def test_nan_counts_as_the_largest_magnitude():
    w = torch.tensor([[1.0, float("nan"), 3.0, 2.0], [float("nan")] * 4])
    assert mask_2_4(w).tolist() == [[False, True, True, False], [True, True, False, False]]


def test_reduction_size_not_multiple_of_four_is_an_error():
    with pytest.raises(ValueError, match="multiple of 4, got 6"):
        mask_2_4(torch.randn(3, 6))
    with pytest.raises(ValueError, match="multiple of 4, got 9"):
        mask_2_4(torch.randn(3, 1, 3, 3))
    with pytest.raises(ValueError, match="reduction axis"):
        mask_2_4(torch.randn(8))
    with pytest.raises(ValueError):
        compress_2_4(torch.randn(2, 10))


@pytest.mark.parametrize("shape", [(5, 16), (4, 2, 2, 2)])
def test_compress_decompress_round_trip(shape):
    w = apply_2_4(torch.randn(shape))
    values, indices = compress_2_4(w)
    k = w[0].numel()
    assert values.shape == indices.shape == (shape[0], k // 2)
    assert values.dtype == w.dtype and indices.dtype == torch.uint8
    assert int(indices.max()) <= 3
    pairs = indices.reshape(shape[0], -1, 2)
    assert (pairs[..., 0] < pairs[..., 1]).all()  # ascending within each group
    assert torch.equal(decompress_2_4(values, indices, k).reshape(shape), w)
    # A dense weight round-trips to its pruned version.
    dense = torch.randn(shape)
    assert torch.equal(decompress_2_4(*compress_2_4(dense), k).reshape(shape), apply_2_4(dense))


def test_compress_keeps_every_nonzero_of_a_sparser_group():
    w = torch.tensor([[0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    values, indices = compress_2_4(w)
    assert torch.equal(decompress_2_4(values, indices, 8), w)
    assert 3.0 in values.tolist()[0]


def test_decompress_rejects_inconsistent_storage():
    values, indices = compress_2_4(apply_2_4(torch.randn(2, 8)))
    with pytest.raises(ValueError, match="multiple of 4"):
        decompress_2_4(values, indices, 6)
    with pytest.raises(ValueError, match="same shape"):
        decompress_2_4(values, indices, 12)
    with pytest.raises(ValueError, match="same shape"):
        decompress_2_4(values[:, :2], indices, 8)
    with pytest.raises(ValueError, match="0..3"):
        decompress_2_4(values, torch.full_like(indices, 4), 8)
    with pytest.raises(ValueError, match="repeat"):
        decompress_2_4(values, torch.zeros_like(indices), 8)
    with pytest.raises(ValueError, match="integer"):
        decompress_2_4(values, indices.float(), 8)


def test_sr_ste_gradient_is_straight_through_plus_decay_on_pruned_weights():
    w = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    mask = mask_2_4(w)
    decay = 0.3
    out = sr_ste(w, mask, decay)
    assert torch.equal(out.detach(), apply_2_4(w.detach()))
    upstream = torch.randn(3, 8, dtype=torch.float64)
    (out * upstream).sum().backward()
    expected = upstream + decay * (~mask).to(w.dtype) * w.detach()
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=1e-12)
    # Kept weights see the plain gradient; decay 0 is the plain straight-through estimator.
    torch.testing.assert_close(w.grad[mask], upstream[mask], rtol=0, atol=0)
    w.grad = None
    (sr_ste(w, mask, 0.0) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream, rtol=0, atol=0)


def test_sr_ste_inside_a_layer_on_a_conv_weight():
    conv = torch.nn.Conv2d(4, 6, 3, bias=False)  # reduction 4 * 3 * 3 = 36
    mask = mask_2_4(conv.weight)
    x = torch.randn(2, 4, 5, 5)
    y = torch.nn.functional.conv2d(x, sr_ste(conv.weight, mask, decay=2e-4))
    y.square().mean().backward()
    assert conv.weight.grad is not None and conv.weight.grad.shape == conv.weight.shape
    assert (conv.weight.grad[~mask] != 0).any()  # pruned weights still receive a gradient


def test_sr_ste_zeroes_a_non_finite_weight_pruned_by_an_earlier_mask():
    w = torch.tensor([[4.0, 3.0, float("inf"), float("nan")]], requires_grad=True)
    stale = torch.tensor([[True, True, False, False]])
    assert sr_ste(w, stale, 0.1).tolist() == [[4.0, 3.0, 0.0, 0.0]]


def test_sr_ste_rejects_bad_arguments():
    w = torch.randn(2, 4)
    with pytest.raises(ValueError, match="bool"):
        sr_ste(w, mask_2_4(w).float(), 0.1)
    with pytest.raises(ValueError, match="shape"):
        sr_ste(w, torch.ones(2, 8, dtype=torch.bool), 0.1)
    with pytest.raises(ValueError, match="decay"):
        sr_ste(w, mask_2_4(w), -1.0)
