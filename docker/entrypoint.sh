#!/usr/bin/env bash
# Runs the given command inside the rlrr image (e.g. python tools/demo.py).
set -euo pipefail
exec "$@"
