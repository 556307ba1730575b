#!/usr/bin/env bash
# Set up everything deploycomp needs on a fresh Debian/Ubuntu machine with Python 3.10+:
# the Fashion-MNIST data package, a virtualenv in .venv, torch (CPU build), deploycomp with its
# backends, zoo models and benchmark peers, pinned by constraints.txt. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -c constraints.txt -e ".[openvino,zoo,bench,dev]"
# foolbox is used only for the 20 labelled ImageNet photos it ships; its own dependencies are not.
.venv/bin/pip install -q --no-deps "foolbox==3.3.4"
