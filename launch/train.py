#!/usr/bin/env python
"""Entry point: parse and call rlrr.train.main.

    python launch/train.py --config configs/demo.yaml
    torchrun --nproc_per_node=8 launch/train.py --config configs/vtab/kitti.yaml --set train.lr=0.003
    srun python launch/train.py --config ...   # one task per GPU: rank/world from SLURM_* variables
"""
import os
import sys

import torch.distributed as dist

from rlrr.config import ConfigError
from rlrr.train import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"train: error: {e}", file=sys.stderr)
        sys.exit(2)
    if dist.is_initialized():
        # gloo may abort (SIGABRT) in interpreter teardown after all work is done, and torchrun would
        # report the run as failed: flush, meet the other ranks, and leave without the teardown
        sys.stdout.flush()
        sys.stderr.flush()
        dist.barrier()
        os._exit(0)
