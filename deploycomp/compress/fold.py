"""Fold a trained joint-compression student back into plain torch layers for export.

Takes a model after :func:`~deploycomp.compress.joint.compress_` and training, replaces in place
every Compressed* wrapper by a plain ``nn.Linear`` / ``nn.Conv2d`` whose weight is the wrapper's
effective weight (masked and on the quantization grid: exact ``scale * integer`` values, exact zeros
where pruned), and returns per module path what the exporter needs to place the quantization nodes:
schemes, weight scales, the input's activation scale and the 2:4 mask. The plain layers do not
quantize their input any more: the exporter places that activation Q/DQ from ``activation_scale``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deploycomp.compress.modules import CompressedConv2d, CompressedEmbedding, _CompressedLayer
from deploycomp.errors import DeployCompError


class PaddedConv2d(nn.Conv2d):
    """A Conv2d that pads its input first (a folded EfficientNet-style "same" convolution)."""

    static_padding: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


def plain_layer(layer: _CompressedLayer, weight: nn.Parameter) -> nn.Linear | nn.Conv2d:
    """The ``nn.Linear`` / ``nn.Conv2d`` ``layer`` wraps, computing with ``weight`` and its bias.

    The bias Parameter is shared with ``layer``, not copied.

    Example:
        >>> from deploycomp.compress.modules import CompressedLinear
        >>> layer = CompressedLinear(nn.Linear(8, 4), sparsity="2:4")
        >>> plain_layer(layer, layer.weight)
        Linear(in_features=8, out_features=4, bias=True)
    """
    has_bias = layer.bias is not None
    plain: nn.Linear | nn.Conv2d
    # Built on the meta device: its own Parameters are replaced below, so nothing is allocated.
    if isinstance(layer, CompressedConv2d):
        plain = (nn.Conv2d if layer.static_padding is None else PaddedConv2d)(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            has_bias,
            layer.padding_mode,
            device="meta",
        )
    elif isinstance(layer, CompressedEmbedding):
        plain = nn.Embedding(
            layer.num_embeddings,
            layer.embedding_dim,
            layer.padding_idx,
            layer.max_norm,
            layer.norm_type,
            layer.scale_grad_by_freq,
            layer.sparse,
            device="meta",
        )
        plain.weight = weight
        return plain.train(layer.training)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, has_bias, device="meta")
    if isinstance(plain, PaddedConv2d):
        plain.static_padding = layer.static_padding
    plain.weight = weight
    plain.bias = layer.bias
    return plain.train(layer.training)


@torch.no_grad()
def folded_weight(layer: _CompressedLayer) -> torch.Tensor:
    """The weight export writes for ``layer``: masked, then ``integer codes * scale``.

    This is the training forward's effective weight up to the float rounding of the LSQ step's
    gradient scaling (a relative 1e-7), and exactly the grid values the exporter's
    QuantizeLinear/DequantizeLinear pair reproduces from ``weight_quant.scale()``.

    Example:
        >>> from deploycomp.compress.modules import CompressedLinear
        >>> layer = CompressedLinear(nn.Linear(8, 4), weight="int8_sym_per_channel")
        >>> codes = folded_weight(layer) / layer.weight_quant.scale()[:, None]
        >>> bool((codes - codes.round()).abs().max() < 1e-4)
        True
    """
    weight = layer.weight.detach()
    if layer.mask is not None:
        weight = torch.where(layer.mask, weight, weight.new_zeros(()))
    quant = layer.weight_quant
    if quant is None:
        return weight.clone()
    codes = quant.to_integer(weight).reshape(quant.out_channels, quant.groups_per_channel, -1)
    scale = quant.scale().reshape(quant.out_channels, quant.groups_per_channel, 1)
    return (codes.to(weight.dtype) * scale).reshape(weight.shape)


def _export_info(name: str, layer: _CompressedLayer) -> dict[str, Any]:
    activation_scale = None
    if layer.input_quant is not None:
        if not bool(layer.input_quant.initialized):
            raise DeployCompError(
                f"layer {name!r}: its input quantizer ({layer.activation_scheme!r}) has never "
                f"seen a batch, so it has no scale to export; train the model (train_joint) or "
                f"run one forward in train mode before fold_"
            )
        activation_scale = float(layer.input_quant.scale())
    weight_quant = layer.weight_quant
    return {
        "weight": layer.weight_scheme,
        "weight_scale": (
            None if weight_quant is None else weight_quant.scale().to(torch.float32).cpu().numpy()
        ),
        "activation": layer.activation_scheme,
        "activation_scale": activation_scale,
        "sparsity": layer.sparsity,
        "mask": None if layer.mask is None else layer.mask.cpu().numpy().copy(),
    }


def fold_(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Replace, in place, every Compressed* wrapper by the plain layer export reads.

    Each wrapper becomes an ``nn.Linear`` / ``nn.Conv2d`` whose weight is :func:`folded_weight`
    (exact zeros where the mask prunes, ``integer * scale`` on the quantization grid) and whose
    bias is the wrapper's. The plain layer no longer fake-quantizes its input: applying
    ``clamp(round(x / activation_scale), qmin, qmax) * activation_scale`` to its input gives the
    wrapper's eval-mode output back (up to float rounding); the exporter places exactly that
    QuantizeLinear/DequantizeLinear pair. Every wrapper is checked before the model is touched.

    Args:
        model: a model after ``compress_`` and training; a wrapper may also be the model itself.

    Returns:
        Per module path (as in ``model.named_modules()``): ``weight`` (scheme, ``"fp32"`` when not
        quantized), ``weight_scale`` (float32 ndarray ``[out]`` per channel or ``[out, K / g]``
        per group; None for fp32), ``activation`` (scheme of the input), ``activation_scale``
        (float, None for fp32), ``sparsity`` (``"2:4"`` or ``"none"``) and ``mask`` (bool ndarray
        of the weight's shape, True where kept; None without sparsity).

    Raises:
        DeployCompError: an input quantizer never saw a training batch (it has no scale yet), or
            ``model`` itself is a wrapper (it cannot be replaced in place).

    Example:
        >>> from deploycomp.compress.modules import CompressedLinear
        >>> model = nn.Sequential(CompressedLinear(nn.Linear(8, 4), weight="int4_sym_group4"))
        >>> info = fold_(model)
        >>> type(model[0]).__name__, info["0"]["weight_scale"].shape
        ('Linear', (4, 2))
    """
    if isinstance(model, _CompressedLayer):
        raise DeployCompError(
            f"fold_ replaces wrappers inside a model, got a bare {type(model).__name__}; wrap it, "
            f"e.g. fold_(nn.Sequential(layer)), or call folded_weight(layer)"
        )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _CompressedLayer)}
    info = {name: _export_info(name, layer) for name, layer in layers.items()}
    for name, layer in layers.items():
        weight = nn.Parameter(folded_weight(layer), requires_grad=layer.weight.requires_grad)
        model.set_submodule(name, plain_layer(layer, weight))
    return info
