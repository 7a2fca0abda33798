#!/usr/bin/env bash
# Installs the package with its test dependencies and runs the fast test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test,openvino
.venv/bin/python -m pytest -m "not slow and not gpu" --timeout 900 "$@"
