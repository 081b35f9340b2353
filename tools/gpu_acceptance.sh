#!/usr/bin/env bash
# GPU acceptance in one command: every GPU path once (benchmarks with MFU, engines, NCCL training runs),
# written to <out-dir>/acceptance.{json,md}; exit 1 naming the steps that broke. See tools/gpu_acceptance.py.
#   bash tools/gpu_acceptance.sh --out-dir gpu-acceptance
#   bash tools/gpu_acceptance.sh --dry-run --out-dir /tmp/acceptance   # the same steps, tiny, on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's rlrr, installed or not (and in every step)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
exec "$PY" tools/gpu_acceptance.py "$@"
