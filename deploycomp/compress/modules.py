"""Linear and Conv2d layers that train under a 2:4 mask, weight fake quantization and input
fake quantization at once.

Takes an existing ``nn.Linear`` or ``nn.Conv2d`` (and optionally the plan's LayerDecision for it)
and returns a wrapper that keeps the original ``weight`` and ``bias`` Parameters, so state-dict keys
and optimizer references survive the swap. The effective weight is ``weight_quant(sr_ste(weight,
mask))``: the 2:4 mask (bool buffer ``mask``, recomputed from magnitudes by :meth:`update_mask`
until :meth:`freeze_mask`) is applied with the SR-STE gradient, and the learned-step quantizer sees
only the surviving weights. Everything the exporter needs is readable without running the model:
``mask``, ``weight_quant.scale()``, ``input_quant.scale()`` and :meth:`effective_weight`.

On a CUDA GPU with Triton, a linear layer with both a mask and a weight quantizer can compute that
effective weight with one fused kernel (``deploycomp.kernels.triton_fq24``) whose output and
gradients are bit-identical to the unfused path (checked in Triton's interpreter; on a GPU by
tests/gpu): ``layer.use_fused_kernel = True`` turns it on.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deploycomp.artifacts import LayerDecision
from deploycomp.compress.fake_quant import ActivationFakeQuant, WeightFakeQuant, _scale_gradient
from deploycomp.errors import DeployCompError
from deploycomp.kernels.quantize import TINY_SCALE
from deploycomp.kernels.sparsity import GROUP_SIZE, mask_2_4, sr_ste

FP32 = "fp32"
SPARSITY_SCHEMES = ("none", "2:4")
DEFAULT_SR_STE_DECAY = 2e-4


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class _CompressedLayer(nn.Module):
    """Shared state and training logic; subclasses supply the layer's computation."""

    _kinds: tuple[str, ...] = ()
    _module_type: type[nn.Module] = nn.Module
    # Whether effective_weight may run the fused Triton kernel (see _fused_kernel_applies).
    use_fused_kernel: bool = False

    def __init__(
        self,
        module: nn.Module,
        *,
        weight: str = FP32,
        activation: str = FP32,
        sparsity: str = "none",
        sr_ste_decay: float = DEFAULT_SR_STE_DECAY,
    ) -> None:
        super().__init__()
        if sparsity not in SPARSITY_SCHEMES:
            raise DeployCompError(
                f"unknown sparsity {sparsity!r}; expected one of {SPARSITY_SCHEMES}; fix the "
                f"plan's `sparsity` field"
            )
        if not sr_ste_decay >= 0:  # also rejects NaN
            raise DeployCompError(f"sr_ste_decay must be >= 0, got {sr_ste_decay!r}")
        self.weight = module.weight
        self.bias = getattr(module, "bias", None)  # an embedding table has none
        self.weight_scheme, self.activation_scheme, self.sparsity = weight, activation, sparsity
        self.sr_ste_decay = float(sr_ste_decay)
        mask = None
        if sparsity == "2:4":
            reduction_size = self.weight[0].numel()
            if reduction_size % GROUP_SIZE:
                raise DeployCompError(
                    f"2:4 sparsity needs the reduction size to be a multiple of {GROUP_SIZE}, got "
                    f"{reduction_size} for weight shape {tuple(self.weight.shape)!r}; set this "
                    f"layer's sparsity to 'none' in the plan"
                )
            mask = mask_2_4(self.weight)
        self.register_buffer("mask", mask)
        self.register_buffer("mask_frozen", torch.tensor(False, device=self.weight.device))
        self.weight_quant = (
            None if weight == FP32 else WeightFakeQuant(weight, self.weight.detach(), mask)
        )
        self.input_quant = (
            None
            if activation == FP32
            else ActivationFakeQuant(activation).to(self.weight.device, self.weight.dtype)
        )

    @classmethod
    def from_decision(
        cls,
        module: nn.Module,
        decision: LayerDecision,
        sr_ste_decay: float = DEFAULT_SR_STE_DECAY,
    ) -> _CompressedLayer:
        """Build the wrapper a plan's decision asks for.

        Raises:
            DeployCompError: the decision's kind or weight shape does not fit ``module``, or one
                of its schemes is unknown or cannot apply to the layer; the message names it.

        Example:
            >>> decision = LayerDecision("fc", "/fc/Gemm", "linear", (4, 8), 32,
            ...     "int8_sym_per_channel", "fp32", "2:4", "example")
            >>> CompressedLinear.from_decision(nn.Linear(8, 4), decision).mask.shape
            torch.Size([4, 8])
        """
        if decision.kind not in cls._kinds or not isinstance(module, cls._module_type):
            raise DeployCompError(
                f"layer {decision.name!r}: the plan says kind {decision.kind!r} but the module is "
                f"a {type(module).__name__}; {cls.__name__} takes a {cls._module_type.__name__} "
                f"of kind {' or '.join(cls._kinds)}; was the plan made for another model?"
            )
        shape = tuple(module.weight.shape)
        # A linear layer exported as MatMul stores its weight transposed, [in, out].
        allowed = {shape, shape[::-1]} if decision.kind == "linear" else {shape}
        if decision.weight_shape and tuple(decision.weight_shape) not in allowed:
            raise DeployCompError(
                f"layer {decision.name!r}: the plan's weight shape {tuple(decision.weight_shape)!r}"
                f" differs from the module's {shape!r}; was the plan made for another model?"
            )
        try:
            return cls(
                module,
                weight=decision.weight,
                activation=decision.activation,
                sparsity=decision.sparsity,
                sr_ste_decay=sr_ste_decay,
            )
        except DeployCompError as err:
            raise DeployCompError(f"layer {decision.name!r}: {err}") from err

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with: masked (SR-STE), then fake-quantized."""
        if self._fused_kernel_applies():
            return self._fused_effective_weight()
        weight = self.weight
        if self.mask is not None:
            weight = sr_ste(weight, self.mask, self.sr_ste_decay)
        if self.weight_quant is not None:
            weight = self.weight_quant(weight)
        return weight

    def _fused_kernel_applies(self) -> bool:
        """Mask and weight quantizer both present, a CUDA float weight with a step of its dtype
        (the unfused path would promote a mixed pair), Triton installed, and no tracer or
        compiler watching (they cannot see into the kernel)."""
        return (
            self.use_fused_kernel
            and self.mask is not None
            and self.weight_quant is not None
            and self.weight.is_cuda
            and self.weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and self.weight_quant.step.dtype == self.weight.dtype
            and _triton_available()
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        )

    def _fused_effective_weight(self) -> torch.Tensor:
        """:meth:`effective_weight` in one kernel: the step is prepared exactly as
        ``lsq_fake_quantize`` prepares it, and the kernel's autograd function reproduces the
        gradients of ``sr_ste`` followed by ``lsq_fake_quantize`` bit for bit."""
        # Imported here: Triton is optional and this path runs only on a GPU.
        from deploycomp.kernels.triton_fq24 import fake_quant_2_4_ste

        quant = self.weight_quant
        grad_scale = 1.0 / math.sqrt(quant.elements_per_step * quant.qmax)
        step = quant.step.reshape(quant.out_channels, quant.groups_per_channel, 1)
        positive_step = _scale_gradient(step.abs().clamp(min=TINY_SCALE), grad_scale)
        weight = self.weight.reshape(quant.out_channels, -1)
        mask = self.mask.reshape(weight.shape)
        weight_q, _ = fake_quant_2_4_ste(weight, positive_step, quant.qmax, mask, self.sr_ste_decay)
        return weight_q.reshape(self.weight.shape)

    @torch.no_grad()
    def update_mask(self) -> int:
        """Recompute the 2:4 mask from the current magnitudes; returns how many entries flipped.

        A layer without a mask, or with a frozen one, is left unchanged and returns 0.

        Example:
            >>> layer = CompressedLinear(nn.Linear(8, 4), sparsity="2:4")
            >>> layer.update_mask()
            0
        """
        if self.mask is None or bool(self.mask_frozen):
            return 0
        new_mask = mask_2_4(self.weight)
        flips = int((new_mask != self.mask).sum())
        self.mask.copy_(new_mask)
        return flips

    def freeze_mask(self) -> None:
        """Stop :meth:`update_mask` from changing the mask (the flag is saved in the state dict)."""
        self.mask_frozen.fill_(True)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Adopt ``mask`` (e.g. the pattern an earlier training phase froze) and freeze it.

        The weight quantizer's steps are re-initialised on the weights that survive ``mask``, so
        its range fits the pattern it will be trained under.

        Raises:
            DeployCompError: the layer has no 2:4 mask, or ``mask`` is not a 2:4 bool mask of the
                weight's shape.

        Example:
            >>> layer = CompressedLinear(nn.Linear(8, 4), sparsity="2:4")
            >>> layer.set_mask(torch.tensor([[True, True, False, False] * 2] * 4))
            >>> bool(layer.mask_frozen), layer.update_mask()
            (True, 0)
        """
        if self.mask is None:
            raise DeployCompError(
                f"set_mask needs a layer with 2:4 sparsity, this one has sparsity "
                f"{self.sparsity!r}; build it with sparsity='2:4'"
            )
        is_2_4 = mask.dtype == torch.bool and mask.shape == self.mask.shape
        if is_2_4:
            kept = mask.reshape(mask.shape[0], -1, GROUP_SIZE).sum(dim=-1)
            is_2_4 = bool((kept == GROUP_SIZE // 2).all())
        if not is_2_4:
            raise DeployCompError(
                f"set_mask expects a bool mask of shape {tuple(self.mask.shape)!r} keeping 2 of "
                f"every 4 weights, got dtype {mask.dtype} and shape {tuple(mask.shape)!r}; pass "
                f"the `mask` buffer of a layer with the same weight"
            )
        self.mask.copy_(mask)
        self.freeze_mask()
        if self.weight_quant is not None:
            self.weight_quant.reinit(self.weight.detach(), self.mask)

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self._compute(x, self.effective_weight())

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight_scheme!r}, activation={self.activation_scheme!r}, "
            f"sparsity={self.sparsity!r}, shape={tuple(self.weight.shape)}"
        )


class CompressedLinear(_CompressedLayer):
    """An ``nn.Linear`` under joint compression (see the module docstring).

    Args:
        module: the layer to wrap; its ``weight`` and ``bias`` Parameters are reused.
        weight: ``"fp32"``, ``"int8_sym_per_channel"`` or ``"int4_sym_group<g>"``.
        activation: ``"fp32"``, ``"int8_sym_per_tensor"`` or ``"uint8_per_tensor"`` (the input).
        sparsity: ``"none"`` or ``"2:4"``.
        sr_ste_decay: SR-STE decay pulling pruned weights toward zero.

    Example:
        >>> layer = CompressedLinear(nn.Linear(8, 4), weight="int4_sym_group4", sparsity="2:4")
        >>> layer(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    _kinds = ("linear",)
    _module_type = nn.Linear
    # Off until tests/gpu/test_triton_kernels.py has passed on a GPU: its identity with the
    # unfused path is proven in Triton's CPU interpreter only. Set True per layer to try it.
    use_fused_kernel = False

    def __init__(self, module: nn.Linear, **schemes: Any) -> None:
        super().__init__(module, **schemes)
        self.in_features, self.out_features = module.in_features, module.out_features

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)


def wrappable(module: nn.Module) -> bool:
    """Whether a wrapper computes what ``module`` computes: a plain Linear/Conv2d/Embedding, or a
    Conv2d subclass whose own forward only pads first (TensorFlow-style "same" padding kept in a
    ``static_padding`` module, as EfficientNet ports do). Other subclasses stay uncompressed."""
    if not isinstance(module, nn.Conv2d) or type(module).forward is nn.Conv2d.forward:
        return True
    return isinstance(getattr(module, "static_padding", None), nn.Module)


class CompressedConv2d(_CompressedLayer):
    """An ``nn.Conv2d`` (dense, depthwise or grouped) under joint compression.

    Takes the same arguments as :class:`CompressedLinear`; stride, padding, dilation, groups and
    padding mode are copied from ``module``.

    Example:
        >>> layer = CompressedConv2d(nn.Conv2d(4, 8, 3), activation="int8_sym_per_tensor")
        >>> layer.train()(torch.randn(1, 4, 6, 6)).shape
        torch.Size([1, 8, 4, 4])
    """

    _kinds = ("conv2d", "conv2d_depthwise", "conv2d_grouped")
    _module_type = nn.Conv2d

    def __init__(self, module: nn.Conv2d, **schemes: Any) -> None:
        super().__init__(module, **schemes)
        self.in_channels, self.out_channels = module.in_channels, module.out_channels
        self.kernel_size, self.stride, self.padding = (
            module.kernel_size,
            module.stride,
            module.padding,
        )
        self.dilation, self.groups = module.dilation, module.groups
        self.padding_mode = module.padding_mode
        self._reversed_padding_repeated_twice = module._reversed_padding_repeated_twice
        if not wrappable(module):
            raise DeployCompError(
                f"{type(module).__name__} overrides Conv2d.forward with more than a static "
                "padding, which a compressed layer cannot reproduce; keep this layer fp32"
            )
        # "same" padding applied before the convolution (None for a plain Conv2d)
        self.static_padding = getattr(module, "static_padding", None)

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.static_padding is not None:
            x = self.static_padding(x)
        if self.padding_mode != "zeros":
            padded = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(padded, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class CompressedEmbedding(_CompressedLayer):
    """An ``nn.Embedding`` whose table is stored quantized (weight-only: rows are looked up, not
    multiplied, so there is no input to quantize and no 2:4 to exploit).

    ``int8_sym_per_channel`` keeps one step per row; ``int4_sym_group<g>`` one per group of ``g``
    along the hidden axis, the layout the exporter writes for a DequantizeLinear before Gather.

    Example:
        >>> table = CompressedEmbedding(nn.Embedding(10, 8), weight="int4_sym_group4")
        >>> table(torch.tensor([[1, 2]])).shape
        torch.Size([1, 2, 8])
    """

    _kinds = ("embedding",)
    _module_type = nn.Embedding

    def __init__(self, module: nn.Embedding, **schemes: Any) -> None:
        if schemes.get("activation", FP32) != FP32 or schemes.get("sparsity", "none") != "none":
            raise DeployCompError(
                f"an embedding table takes weight-only quantization; got activation "
                f"{schemes.get('activation')!r} and sparsity {schemes.get('sparsity')!r}; set "
                f"them to 'fp32' and 'none' in the plan"
            )
        super().__init__(module, **schemes)
        self.num_embeddings, self.embedding_dim = module.num_embeddings, module.embedding_dim
        self.padding_idx, self.max_norm = module.padding_idx, module.max_norm
        self.norm_type, self.scale_grad_by_freq = module.norm_type, module.scale_grad_by_freq
        self.sparse = module.sparse

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            x,
            weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
