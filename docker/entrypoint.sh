#!/usr/bin/env bash
# Entry point of the rlrr image (working directory /opt/rlrr):
#   docker run rlrr --config configs/vtab/kitti.yaml [--set ...]     -> python launch/train.py --config ...
#   docker run rlrr torchrun --nproc_per_node=8 launch/train.py ...  -> run as given
#   docker run rlrr python tools/report.py runs/                     -> run as given
set -euo pipefail
case "${1:-}" in
  "" | -*) exec python launch/train.py "$@" ;;
  *) exec "$@" ;;
esac
