#!/usr/bin/env bash
# Set up (see setup.sh), then compile the pretrained Fashion-MNIST CNN for this machine's CPU with
# ONNX Runtime and OpenVINO, measure against fp32, and print the report. Extra arguments go to
# `deploycomp compile` (e.g. a different model: scripts/demo.sh with MODEL=minilm-l6).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/deploycomp compile "${MODEL:-fmnist-cnn}" --target auto -o "${OUT:-deploycomp-out}" "$@"
