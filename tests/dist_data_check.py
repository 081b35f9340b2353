"""Run under torchrun (2 processes, gloo): what each rank's loaders yield, gathered into one JSON file.

    torchrun --standalone --nproc_per_node=2 tests/dist_data_check.py SHARDS OUT.json
"""
import json
import os
import sys

import torch.distributed as dist

from rlrr.data.loader import SplitLoader
from rlrr.data.manifest import Manifest
from rlrr.data.transforms import Recipe


def main(shards: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest = Manifest(shards)
    result = {}
    for in_memory in (False, True):
        mode = "memory" if in_memory else "stream"
        train = SplitLoader(manifest, "train800", train=True, batch_size=4,
                            recipe=Recipe("vtab", True, True, image_size=32), rank=rank, world=world, workers=2,
                            seed=7, in_memory=in_memory)
        for epoch in (0, 1):
            batches = [k for _, _, k in train.epoch(epoch)]
            result[f"train_{mode}_epoch{epoch}"] = {"len": len(train), "batches": batches}
        test = SplitLoader(manifest, "test", train=False, batch_size=5, recipe=Recipe("vtab", False, image_size=32),
                           rank=rank, world=world, workers=2, in_memory=in_memory)
        result[f"test_{mode}"] = [key for _, _, keys in test.epoch(0) for key in keys]
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo can abort during interpreter teardown (see launch/train.py); all work is done and flushed


if __name__ == "__main__":
    main(*sys.argv[1:3])
