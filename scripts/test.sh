#!/usr/bin/env bash
# Installs the package with its test dependencies and runs the fast test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test,openvino
# The HTML report is checked in headless Chromium (tests/test_report_html.py).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi
# The example checkpoint the tests measure: trained here (a few minutes on 2 cores) rather than inside a test,
# so that the per-test timeout applies to the tests and not to the training.
if [ ! -f checkpoints/fashion_resnet.safetensors ]; then
  .venv/bin/python -m optimizer.examples.train_fashion --out checkpoints/fashion_resnet.safetensors
fi
.venv/bin/python -m pytest -m "not slow and not gpu" --timeout 900 --durations=25 "$@"
