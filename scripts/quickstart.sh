#!/usr/bin/env bash
# The quick start, end to end: install, train the example checkpoint if it is not there yet (a few
# minutes on 2 CPU cores), then export it to ONNX, quantize it to INT8 and measure every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
checkpoint=checkpoints/fashion_resnet.safetensors
if [ ! -f "$checkpoint" ]; then
  .venv/bin/python -m optimizer.examples.train_fashion --out "$checkpoint"
fi
.venv/bin/optimizer run recipes/quickstart.yaml --out runs/quickstart
