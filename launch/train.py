#!/usr/bin/env python
"""Entry point: parse and call rlrr.train.main.

    python launch/train.py --config configs/demo.yaml
    torchrun --nproc_per_node=8 launch/train.py --config configs/vtab/kitti.yaml --set train.lr=0.003
    srun python launch/train.py --config ...   # one task per GPU: rank/world from SLURM_* variables
"""
import os
import sys

import torch.distributed as dist

from rlrr.train import cli

if __name__ == "__main__":
    code = cli(sys.argv[1:])  # 2: a bad input, reported in one line
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        # gloo may abort (SIGABRT) in interpreter teardown after all work is done, and torchrun would
        # report the run as failed: meet the other ranks (after a success), and leave without the teardown
        if code == 0:
            dist.barrier()
        os._exit(code)
    sys.exit(code)
