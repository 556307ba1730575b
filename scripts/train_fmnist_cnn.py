"""Train the ``fmnist-cnn`` zoo model and write its committed checkpoint and metadata.

Reads Fashion-MNIST from the Debian package, trains :class:`deploycomp.zoo.fmnist_cnn.FashionCNN`
with Adam for a few epochs (seeded, deterministic, CPU), reports test top-1, and writes
``deploycomp/zoo/weights/fmnist_cnn.safetensors`` plus ``fmnist_cnn.json``.

Usage: ``python scripts/train_fmnist_cnn.py [--epochs 3] [--seed 0] [--threads 2]``
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
from torch import nn

from deploycomp.zoo import _common
from deploycomp.zoo import fashion_mnist as fm
from deploycomp.zoo.fmnist_cnn import METADATA_FILE, WEIGHTS_FILE, FashionCNN


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on normalised images ``x`` with labels ``y``."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size])
            correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return correct / len(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    train_images, train_labels = fm.load_split("train")
    test_images, test_labels = fm.load_split("test")
    x_train = torch.from_numpy(fm.normalize(train_images))
    y_train = torch.from_numpy(np.array(train_labels))
    x_test = torch.from_numpy(fm.normalize(test_images))
    y_test = torch.from_numpy(np.array(test_labels))

    model = FashionCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(args.seed)
    start_s = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=shuffle)
        for start in range(0, len(order), args.batch_size):
            index = order[start : start + args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[index]), y_train[index])
            loss.backward()
            optimizer.step()
        top1 = evaluate(model, x_test, y_test)
        elapsed_s = time.perf_counter() - start_s
        print(
            f"epoch {epoch + 1}: loss {loss.item():.4f}  test top-1 {top1:.4f}  {elapsed_s:.0f} s"
        )

    model.eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    save_file(state, str(_common.WEIGHTS_DIR / WEIGHTS_FILE), metadata={"format": "pt"})
    metadata = {
        "model": "fmnist-cnn",
        "architecture": "deploycomp.zoo.fmnist_cnn.FashionCNN",
        "parameters": n_params,
        "command": "python scripts/train_fmnist_cnn.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": f"Adam(lr={args.lr})",
        "input_normalization": f"(x/255 - {fm.PIXEL_MEAN}) / {fm.PIXEL_STD}",
        "test_top1": round(top1, 4),
        "test_samples": len(x_test),
        "train_seconds": round(time.perf_counter() - start_s, 1),
        "torch_version": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    (_common.WEIGHTS_DIR / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {WEIGHTS_FILE} and {METADATA_FILE}: test top-1 {top1:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
