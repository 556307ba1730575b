"""2:4 semi-structured sparsity: reference numerics in plain PyTorch.

Takes a Linear weight ``[out, in]`` or a Conv weight ``[out, in/groups, kh, kw]`` and works on
groups of 4 consecutive elements along its reduction dimension (the last axis of a Linear weight;
the flattened ``in/groups * kh * kw`` axis of a Conv weight, which is the order in which sparse
tensor cores and TensorRT read it). Returns the magnitude mask that keeps 2 of every 4, the pruned
weight, the compressed storage (kept values plus their 2-bit positions) and back, and the SR-STE
autograd function through which joint compression trains masked weights. Everything here is
deterministic and runs on the CPU; fast paths elsewhere are checked against it.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 4
KEPT_PER_GROUP = 2


def _groups(weight: torch.Tensor) -> torch.Tensor:
    """View ``weight`` as ``[out, K / 4, 4]``, K being the flattened reduction size."""
    if weight.ndim < 2:
        raise ValueError(
            f"2:4 sparsity needs a weight with an output axis and a reduction axis, got shape "
            f"{tuple(weight.shape)!r}; pass a Linear weight [out, in] or a Conv weight "
            f"[out, in/groups, kh, kw]"
        )
    k = weight[0].numel()
    if k % GROUP_SIZE:
        raise ValueError(
            f"2:4 sparsity needs the reduction size to be a multiple of {GROUP_SIZE}, got {k} "
            f"for weight shape {tuple(weight.shape)!r}; mark this layer ineligible for 2:4"
        )
    return weight.reshape(weight.shape[0], k // GROUP_SIZE, GROUP_SIZE)


def mask_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 largest magnitudes of every group of 4 along the reduction axis.

    Ties are broken by position: of equal magnitudes the lower index is kept, so the mask depends
    only on the values, never on a sort's implementation.

    Args:
        weight: Linear weight ``[out, in]`` or Conv weight ``[out, in/groups, kh, kw]``.

    Returns:
        A bool tensor of the weight's shape with exactly 2 ``True`` in every group of 4.

    Raises:
        ValueError: the weight has fewer than 2 dimensions or its reduction size is not a multiple
            of 4.

    Example:
        >>> mask_2_4(torch.tensor([[0.1, -3.0, 2.0, 2.0]]))
        tensor([[False,  True,  True, False]])
    """
    magnitude = _groups(weight.detach()).abs()
    # NaN compares false with everything and would leave 3 kept in its group; rank it as the
    # largest magnitude (as topk does), so every group still keeps exactly 2.
    magnitude = torch.where(magnitude.isnan(), float("inf"), magnitude)
    a = magnitude.unsqueeze(-1)  # element i of the group, compared ...
    b = magnitude.unsqueeze(-2)  # ... with every element j
    lower = torch.ones(GROUP_SIZE, GROUP_SIZE, dtype=torch.bool, device=weight.device).tril(-1)
    # rank[i] = how many elements of the group come before i in (magnitude desc, index asc) order;
    # counting beats topk here because topk makes no promise about which of two equal values wins.
    beats = (b > a) | ((b == a) & lower)
    rank = beats.sum(dim=-1)
    return (rank < KEPT_PER_GROUP).reshape(weight.shape)


def is_2_4_sparse(weight: torch.Tensor) -> bool:
    """Whether every group of 4 along the reduction axis has at most 2 nonzeros.

    A weight whose reduction size is not a multiple of 4 (or with fewer than 2 dimensions) cannot
    be 2:4 sparse, so the answer is ``False`` rather than an error.

    Example:
        >>> is_2_4_sparse(torch.tensor([[0.0, 1.0, 0.0, 2.0]]))
        True
    """
    if weight.ndim < 2 or weight[0].numel() % GROUP_SIZE:
        return False
    nonzeros = (_groups(weight) != 0).sum(dim=-1)
    return bool((nonzeros <= KEPT_PER_GROUP).all())


def apply_2_4(weight: torch.Tensor) -> torch.Tensor:
    """The weight with the 2 smallest magnitudes of every group of 4 set to zero.

    Example:
        >>> apply_2_4(torch.tensor([[0.1, -3.0, 2.0, 0.5]]))
        tensor([[ 0., -3.,  2.,  0.]])
    """
    # where() rather than a product: a pruned negative weight becomes +0.0, not -0.0.
    return torch.where(mask_2_4(weight), weight, weight.new_zeros(()))


def compress_2_4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed storage: the 2 kept values of every group of 4 and their positions.

    The kept positions are those of :func:`mask_2_4`, so for a weight that is already 2:4 sparse
    every nonzero is kept and the round trip through :func:`decompress_2_4` is exact; for any other
    weight it reproduces :func:`apply_2_4`. Positions within a group are in ascending order, the
    order of the metadata that sparse tensor cores read.

    Args:
        weight: Linear weight ``[out, in]`` or Conv weight ``[out, in/groups, kh, kw]``.

    Returns:
        ``(values, indices)``, both ``[out, K / 2]`` with K the flattened reduction size: values in
        the weight's dtype, indices as uint8 in 0..3 (position within the group).

    Example:
        >>> values, indices = compress_2_4(torch.tensor([[0.0, 5.0, 0.0, -1.0]]))
        >>> values, indices
        (tensor([[ 5., -1.]]), tensor([[1, 3]], dtype=torch.uint8))
    """
    groups = _groups(weight)
    mask = mask_2_4(weight).reshape(groups.shape)
    out, n_groups = groups.shape[0], groups.shape[1]
    positions = torch.arange(GROUP_SIZE, dtype=torch.uint8, device=weight.device).expand_as(groups)
    # Boolean indexing walks the tensor in row-major order, which keeps positions ascending.
    values = groups[mask].reshape(out, n_groups * KEPT_PER_GROUP)
    indices = positions[mask].reshape(out, n_groups * KEPT_PER_GROUP)
    return values, indices


def decompress_2_4(values: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """Dense tensor from the storage written by :func:`compress_2_4`.

    Args:
        values: kept values ``[..., k / 2]``.
        indices: their positions within each group of 4, ``[..., k / 2]``, integers in 0..3, the
            two of a group distinct.
        k: reduction size of the dense tensor (a multiple of 4).

    Returns:
        The dense tensor ``[..., k]`` in the dtype of ``values``, zeros where nothing was kept. A
        Conv weight comes back flattened: ``.reshape(weight.shape)`` restores it.

    Raises:
        ValueError: shapes disagree with each other or with ``k``, or an index is out of range or
            repeated within a group.

    Example:
        >>> decompress_2_4(torch.tensor([[5.0, -1.0]]), torch.tensor([[1, 3]]), 4)
        tensor([[ 0.,  5.,  0., -1.]])
    """
    if k <= 0 or k % GROUP_SIZE:
        raise ValueError(f"k must be a positive multiple of {GROUP_SIZE}, got {k!r}")
    expected = k // GROUP_SIZE * KEPT_PER_GROUP
    if values.shape != indices.shape or values.ndim == 0 or values.shape[-1] != expected:
        raise ValueError(
            f"values {tuple(values.shape)!r} and indices {tuple(indices.shape)!r} must have the same "
            f"shape, ending in k / 2 = {expected} for k = {k}"
        )
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    lead = values.shape[:-1]
    slots = indices.long().reshape(*lead, k // GROUP_SIZE, KEPT_PER_GROUP)
    if slots.numel() and (slots.min() < 0 or slots.max() >= GROUP_SIZE):
        raise ValueError(
            f"indices must lie in 0..{GROUP_SIZE - 1}, found {slots.min().item()} "
            f"to {slots.max().item()}"
        )
    if (slots[..., 0] == slots[..., 1]).any():
        raise ValueError(
            "indices repeat a position within a group of 4; each group keeps 2 distinct positions"
        )
    dense = torch.zeros(
        *lead, k // GROUP_SIZE, GROUP_SIZE, dtype=values.dtype, device=values.device
    )
    dense.scatter_(-1, slots, values.reshape(slots.shape))
    return dense.reshape(*lead, k)


class SRSTEMask(torch.autograd.Function):
    """Masked weight whose gradient reaches every weight, with a decay on the pruned ones.

    SR-STE (Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From
    Scratch", ICLR 2021): forward ``w * mask``; backward passes the incoming gradient straight
    through to all weights and adds ``decay * (1 - mask) * w`` to it, which pulls pruned weights
    toward zero so a mask recomputed from magnitudes stops flipping. Call it through
    :func:`sr_ste`.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        # where() rather than a product: a mask kept from an earlier step may prune an inf or NaN,
        # which must come out as 0, not NaN.
        return torch.where(mask, weight, weight.new_zeros(()))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        weight, mask = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[0]:
            pruned = torch.where(mask, weight.new_zeros(()), weight)
            grad_weight = grad_output + ctx.decay * pruned
        return grad_weight, None, None


def sr_ste(weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
    """Apply a 2:4 mask with the SR-STE gradient (see :class:`SRSTEMask`).

    Args:
        weight: the dense trainable weight.
        mask: bool mask of the weight's shape (for instance from :func:`mask_2_4`); ``True``
            keeps a weight.
        decay: the SR-STE coefficient (lambda_W in the paper, 2e-4 there); 0 gives the plain
            straight-through estimator.

    Returns:
        ``weight`` with pruned entries zeroed; its gradient to ``weight`` is
        ``grad + decay * (1 - mask) * weight``.

    Raises:
        ValueError: the mask is not bool or not of the weight's shape, or ``decay`` is negative.

    Example:
        >>> w = torch.tensor([[0.1, -3.0, 2.0, 0.5]], requires_grad=True)
        >>> sr_ste(w, mask_2_4(w), decay=0.5).sum().backward()
        >>> w.grad
        tensor([[1.0500, 1.0000, 1.0000, 1.2500]])
    """
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(
            f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)!r}, got "
            f"dtype {mask.dtype} and shape {tuple(mask.shape)!r}"
        )
    if not decay >= 0:  # also rejects NaN
        raise ValueError(f"decay must be >= 0, got {decay!r}")
    return SRSTEMask.apply(weight, mask, float(decay))
