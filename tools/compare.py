#!/usr/bin/env python
"""Compare fine-tuning methods on the same shards under the same recipe (rlrr.compare):

    python tools/compare.py --config configs/demo.yaml --methods rlrr,lora,ssf,bitfit,full,linear \\
        --out-dir runs/compare
    python tools/compare.py --config configs/vtab/kitti.yaml --nproc 8 --methods rlrr,full \\
        --variant "rlrr-r10=rlrr model.rlrr.rank=10" --variant "rlrr-no1=rlrr model.rlrr.form=plain"

``--help`` lists every option.
"""
import sys

from rlrr.compare import main

if __name__ == "__main__":
    sys.exit(main())
