"""Learned-step fake quantizers for joint compression (LSQ, Esser et al., ICLR 2020).

Takes a weight or an activation tensor and returns it rounded to the integer grid of a plan's
scheme and scaled back to float, with a straight-through gradient to the input and a learned
gradient to the step size: :class:`WeightFakeQuant` for ``int8_sym_per_channel`` (one step per
output channel) and ``int4_sym_group<g>`` (one step per group of ``g`` along the reduction axis of
``weight.flatten(1)``), :class:`ActivationFakeQuant` for ``int8_sym_per_tensor`` and
``uint8_per_tensor``. Steps live in a Parameter named ``step`` and are read out with ``scale()``,
in the layout the exporter writes (``[out]`` per channel, ``[out, K / g]`` per group, ``[]`` per
tensor); zero points are always 0.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from deploycomp.errors import DeployCompError
from deploycomp.kernels.quantize import TINY_SCALE

INT8_WEIGHT_SCHEME = "int8_sym_per_channel"
INT4_WEIGHT_SCHEME_PATTERN = re.compile(r"int4_sym_group([1-9][0-9]*)")
WEIGHT_SCHEMES = (INT8_WEIGHT_SCHEME, "int4_sym_group<g>")
# scheme -> (qmin, qmax) of the integer grid
ACTIVATION_GRIDS = {"int8_sym_per_tensor": (-128, 127), "uint8_per_tensor": (0, 255)}
INT8_WEIGHT_QMAX = 127
INT4_WEIGHT_QMAX = 7


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward (half to even, as ONNX QuantizeLinear), identity gradient."""
    return (x.round() - x).detach() + x


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor``."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


def lsq_fake_quantize(
    x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_scale: float
) -> torch.Tensor:
    """LSQ fake quantization: ``clamp(round(x / step), qmin, qmax) * step``.

    The gradient to ``x`` is straight-through inside the grid and 0 where ``x`` is clipped; the
    gradient to ``step`` is LSQ's (``round(v) - v`` inside, ``qmin`` or ``qmax`` outside, with
    ``v = x / step``), multiplied by ``grad_scale``. ``step`` must broadcast against ``x``; its
    magnitude is used, floored at a tiny positive value, so a step pushed through 0 stays valid.

    Example:
        >>> lsq_fake_quantize(torch.tensor([0.26, -2.0]), torch.tensor(0.1), -7, 7, 1.0)
        tensor([ 0.3000, -0.7000])
    """
    positive_step = _scale_gradient(step.abs().clamp(min=TINY_SCALE), grad_scale)
    return _round_ste(torch.clamp(x / positive_step, qmin, qmax)) * positive_step


def parse_weight_scheme(scheme: str) -> tuple[int, int | None]:
    """``(qmax, group_size)`` of a weight scheme; ``group_size`` is None for per-channel.

    Raises:
        DeployCompError: the scheme is neither ``int8_sym_per_channel`` nor ``int4_sym_group<g>``.

    Example:
        >>> parse_weight_scheme("int4_sym_group32")
        (7, 32)
    """
    if scheme == INT8_WEIGHT_SCHEME:
        return INT8_WEIGHT_QMAX, None
    match = INT4_WEIGHT_SCHEME_PATTERN.fullmatch(scheme)
    if match:
        return INT4_WEIGHT_QMAX, int(match.group(1))
    raise DeployCompError(
        f"unknown weight quantization scheme {scheme!r}; expected one of {WEIGHT_SCHEMES} "
        f"(for instance 'int4_sym_group128'); fix the plan's `weight` field"
    )


class WeightFakeQuant(nn.Module):
    """Symmetric weight fake quantization with one learned step per channel or per group.

    The step is initialised to ``max|w| / qmax`` over the weights that survive ``mask`` (all of
    them without one), per output channel for ``int8_sym_per_channel`` (grid [-127, 127]) and per
    group of ``g`` consecutive elements of ``weight.flatten(1)`` for ``int4_sym_group<g>`` (grid
    [-7, 7]). LSQ's gradient scale is ``1 / sqrt(elements_per_step * qmax)``.

    Args:
        scheme: ``"int8_sym_per_channel"`` or ``"int4_sym_group<g>"``.
        weight: the weight to be quantized (Linear ``[out, in]`` or Conv ``[out, in/groups, kh,
            kw]``); only its shape and initial values are used.
        mask: optional bool mask of the weight's shape; ``True`` keeps a weight.

    Raises:
        DeployCompError: unknown scheme, a reduction size the group size does not divide, or a
            mask of the wrong shape or dtype.

    Example:
        >>> quant = WeightFakeQuant("int8_sym_per_channel", torch.randn(8, 16))
        >>> quant.scale().shape
        torch.Size([8])
    """

    def __init__(self, scheme: str, weight: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scheme = scheme
        self.qmax, self.group_size = parse_weight_scheme(scheme)
        if weight.ndim < 2:
            raise DeployCompError(
                f"weight quantization needs a weight with an output axis, got shape "
                f"{tuple(weight.shape)!r}; pass a Linear or Conv weight"
            )
        self.weight_shape = tuple(weight.shape)
        self.out_channels = weight.shape[0]
        self.reduction_size = weight[0].numel()
        if self.group_size is not None and self.reduction_size % self.group_size:
            raise DeployCompError(
                f"{scheme!r} needs the reduction size to be a multiple of {self.group_size}, got "
                f"{self.reduction_size} for weight shape {self.weight_shape!r}; pick a group size "
                f"that divides it or use 'int8_sym_per_channel'"
            )
        self.elements_per_step = self.group_size or self.reduction_size
        self.groups_per_channel = self.reduction_size // self.elements_per_step
        step_shape = (
            (self.out_channels,)
            if self.group_size is None
            else (self.out_channels, self.groups_per_channel)
        )
        self.step = nn.Parameter(torch.ones(step_shape, dtype=weight.dtype, device=weight.device))
        self.reinit(weight, mask)

    def _grouped(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as ``[out, groups_per_channel, elements_per_step]``."""
        if tuple(weight.shape) != self.weight_shape:
            raise DeployCompError(
                f"weight shape {tuple(weight.shape)!r} differs from the shape "
                f"{self.weight_shape!r} this quantizer was built for; build a new WeightFakeQuant"
            )
        return weight.reshape(self.out_channels, self.groups_per_channel, self.elements_per_step)

    @torch.no_grad()
    def reinit(self, weight: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Reset the step to ``max|w| / qmax`` over the surviving weights (in place).

        The Parameter object is kept, so an optimizer holding it keeps working.

        Example:
            >>> w = torch.tensor([[4.0, -1.0, 0.5, 0.2]])
            >>> quant = WeightFakeQuant("int4_sym_group4", w)
            >>> quant.reinit(w, torch.tensor([[False, True, True, False]]))
            >>> quant.scale()
            tensor([[0.1429]])
        """
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != self.weight_shape:
                raise DeployCompError(
                    f"mask must be a bool tensor of the weight's shape {self.weight_shape!r}, got "
                    f"dtype {mask.dtype} and shape {tuple(mask.shape)!r}"
                )
            weight = torch.where(mask, weight, weight.new_zeros(()))
        amax = self._grouped(weight.detach()).abs().amax(dim=-1)
        self.step.copy_((amax / self.qmax).clamp(min=TINY_SCALE).reshape(self.step.shape))

    def _step_view(self) -> torch.Tensor:
        return self.step.reshape(self.out_channels, self.groups_per_channel, 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        grad_scale = 1.0 / math.sqrt(self.elements_per_step * self.qmax)
        grouped = lsq_fake_quantize(
            self._grouped(weight), self._step_view(), -self.qmax, self.qmax, grad_scale
        )
        return grouped.reshape(weight.shape)

    @torch.no_grad()
    def to_integer(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes (int8, in [-qmax, qmax]) of ``weight`` at the current steps.

        Example:
            >>> w = torch.tensor([[0.7, -0.35]])
            >>> WeightFakeQuant("int4_sym_group2", w).to_integer(w)
            tensor([[ 7, -4]], dtype=torch.int8)
        """
        step = self.scale().reshape(self.out_channels, self.groups_per_channel, 1)
        codes = torch.round(self._grouped(weight) / step).clamp(-self.qmax, self.qmax)
        return codes.to(torch.int8).reshape(weight.shape)

    def scale(self) -> torch.Tensor:
        """The current positive steps, detached: ``[out]`` per channel, ``[out, K/g]`` per group."""
        return self.step.detach().abs().clamp(min=TINY_SCALE).clone()

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}, weight_shape={self.weight_shape}"


class ActivationFakeQuant(nn.Module):
    """Per-tensor activation fake quantization with one learned step, zero point 0.

    ``int8_sym_per_tensor`` uses the grid [-128, 127], ``uint8_per_tensor`` the grid [0, 255]
    (negative inputs clip to 0). The step is initialised to ``max|x| / qmax`` from the first
    batch seen in training mode, after which the buffer ``initialized`` is True (and travels in the
    state dict); until then the quantizer passes its input through unchanged. LSQ's gradient scale
    is ``1 / sqrt(x.numel() * qmax)``.

    Args:
        scheme: ``"int8_sym_per_tensor"`` or ``"uint8_per_tensor"``.

    Raises:
        DeployCompError: unknown scheme.

    Example:
        >>> quant = ActivationFakeQuant("uint8_per_tensor").train()
        >>> _ = quant(torch.tensor([0.0, 2.55]))
        >>> quant.scale()
        tensor(0.0100)
    """

    def __init__(self, scheme: str) -> None:
        super().__init__()
        if scheme not in ACTIVATION_GRIDS:
            raise DeployCompError(
                f"unknown activation quantization scheme {scheme!r}; expected one of "
                f"{tuple(ACTIVATION_GRIDS)}; fix the plan's `activation` field"
            )
        self.scheme = scheme
        self.qmin, self.qmax = ACTIVATION_GRIDS[scheme]
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        amax = x.detach().abs().amax().to(self.step.dtype)
        self.step.copy_((amax / self.qmax).clamp(min=TINY_SCALE))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            if not self.training:
                return x
            self._init_from(x)
        grad_scale = 1.0 / math.sqrt(max(x.numel(), 1) * self.qmax)
        return lsq_fake_quantize(x, self.step, self.qmin, self.qmax, grad_scale)

    def scale(self) -> torch.Tensor:
        """The current positive step, detached, as a 0-d tensor."""
        return self.step.detach().abs().clamp(min=TINY_SCALE).clone()

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}"
