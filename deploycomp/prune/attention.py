"""How the pruning graph reads a multi-head attention module: which projections hold the heads.

The graph does not trace into attention: its reshapes into heads and back are what a channel
tracker cannot follow safely. Instead an attention module is a leaf described by an
:class:`AttentionSpec` (found by class, through the MRO, so subclasses match), which names the
query/key/value projections, the optional output projection inside the module, and the
attributes that hold the head count and head size. HuggingFace's ``BertSelfAttention`` is known by
its qualified class name, so transformers is never imported here.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from torch import nn


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Where the heads of one attention class live.

    Args:
        query, key, value: child names of the q/k/v projections (Linear or CompressedLinear).
        num_heads_attr: attribute holding the head count, updated when heads are pruned.
        head_size_attr: attribute holding the size of one head (never changed by pruning).
        all_head_size_attr: optional attribute holding ``num_heads * head_size``, kept in sync.
        output: child name of an output projection inside the module, or None when the module
            returns the concatenated heads (HF BERT: the projection is the sibling
            ``BertSelfOutput.dense``).
        output_index: the module returns a tuple and the attended values are this element; None
            when it returns a tensor.
    """

    query: str
    key: str
    value: str
    num_heads_attr: str
    head_size_attr: str
    all_head_size_attr: str | None = None
    output: str | None = None
    output_index: int | None = None

    @property
    def projections(self) -> tuple[str, str, str]:
        """The child names of the query, key and value projections."""
        return (self.query, self.key, self.value)


_BERT_SELF_ATTENTION = AttentionSpec(
    query="query",
    key="key",
    value="value",
    num_heads_attr="num_attention_heads",
    head_size_attr="attention_head_size",
    all_head_size_attr="all_head_size",
    output_index=0,
)

_SPECS_BY_QUALNAME: dict[str, AttentionSpec] = {
    "transformers.models.bert.modeling_bert.BertSelfAttention": _BERT_SELF_ATTENTION,
}
_SPECS_BY_TYPE: dict[type[nn.Module], AttentionSpec] = {}


def register_attention(module_type: type[nn.Module], spec: AttentionSpec) -> None:
    """Teach the pruning graph how to read the heads of ``module_type`` (and its subclasses).

    Example:
        >>> class SelfAttention(nn.Module): ...
        >>> register_attention(SelfAttention, AttentionSpec("q", "k", "v", "heads", "head_dim"))
    """
    _SPECS_BY_TYPE[module_type] = spec


def attention_spec(module: nn.Module) -> AttentionSpec | None:
    """The spec of ``module``'s class or of its nearest registered base class, else None."""
    for cls in type(module).__mro__:
        spec = _SPECS_BY_TYPE.get(cls) or _SPECS_BY_QUALNAME.get(
            f"{cls.__module__}.{cls.__qualname__}"
        )
        if spec is not None:
            return spec
    return None


# Functions that turn the model's attention mask into the additive mask its attention modules read.
# They branch on the mask's values, so the tracer keeps each call as one opaque node; they read
# the hidden states only for batch size, dtype and device, never their channels.
_MASK_FUNCTIONS = {
    "transformers.masking_utils": ("create_bidirectional_mask", "create_causal_mask"),
}


def mask_functions() -> tuple[Callable, ...]:
    """The known attention-mask builders among the already imported modules."""
    found = []
    for module_name, names in _MASK_FUNCTIONS.items():
        module = sys.modules.get(module_name)
        found += [getattr(module, name) for name in names if hasattr(module, name)]
    return tuple(found)
