"""torchrun for the tests: torch.distributed.run's own ``main`` (the launcher users run), loaded with the
cyclic garbage collector paused and what it loaded then frozen (rlrr.startup), as launch/train.py loads
torch. Importing torch with the collector on costs a launcher about 0.8 s more CPU, and the suite
starts about 60 launchers.

    python tests/torchrun.py --standalone --nproc_per_node=2 launch/train.py --config ...
"""
import sys

from rlrr.startup import long_lived_imports

if __name__ == "__main__":
    with long_lived_imports():
        from torch.distributed.run import main
    sys.exit(main())
