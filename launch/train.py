#!/usr/bin/env python
"""Entry point: parse the command line and call rlrr.train.train.

    python launch/train.py --config configs/demo.yaml
    torchrun --nproc_per_node=8 launch/train.py --config configs/vtab/kitti.yaml --set train.lr=0.003
    srun python launch/train.py --config ...   # one task per GPU: rank/world from SLURM_* variables

Exit codes: 0 done (or stopped with a checkpoint), 1 another rank failed, 2 a bad input, 3 the run
stopped itself (a non-finite loss, say); each a single line on stderr.
"""
import argparse
import os
import sys

from rlrr.config import ConfigError, load_config
from rlrr.errors import DataError, RunStopped
from rlrr.startup import long_lived_imports
from rlrr.world import exit_process, world_from_env

# Nothing above imports torch: rlrr.train (torch, timm and torch._dynamo: about 4 s of CPU) is imported
# where it is used, with the garbage collector paused (rlrr.startup), so that --print-run-dir answers a
# batch script at once, and a loader worker, which runs this file again as __mp_main__ (multiprocessing's
# forkserver does), loads none of it.


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Fine-tune a timm ViT/Swin with RLRR.")
    ap.add_argument("--config", help="YAML run config (see configs/)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="override config keys, e.g. train.lr=0.003 (repeatable)")
    ap.add_argument("--resume", choices=["latest", "auto"],
                    help="continue the run in <output_dir>/<run_name>; auto: if it saved a checkpoint, else start it")
    ap.add_argument("--allow-config-change", action="store_true",
                    help="resume even though keys other than run length and logging changed since the checkpoint")
    ap.add_argument("--print-run-dir", action="store_true",
                    help="print the run directory this config resolves to and exit (for batch scripts)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """Parse ``argv`` and train; the results (empty for --print-run-dir). Tests call this."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.print_run_dir:
        if not cfg.run_name:
            raise ConfigError("run_name is not set, so the run directory is only decided at start; set run_name")
        print(os.path.join(cfg.output_dir, cfg.run_name))
        return {}
    with long_lived_imports():
        import torch._dynamo  # noqa: F401  (every optimizer imports it on first use: torch._disable_dynamo)

        from rlrr.train import train
    return train(cfg, args.resume, args.allow_config_change)


def cli(argv=None) -> int:
    """``main`` for a command line: a bad input (config, file, name) is one line on stderr, printed by
    rank 0 only, and exit code 2; a run that stopped itself (RunStopped) likewise, exit code 3;
    anything else is a bug and keeps its traceback."""
    try:
        main(argv)
    except (ConfigError, DataError, RunStopped) as e:
        if world_from_env().rank == 0:
            print(f"train: error: {e}", file=sys.stderr)
        return 3 if isinstance(e, RunStopped) else 2
    except RuntimeError as e:
        if not lost_a_peer(e):
            raise
        # another rank failed and its own error says why: one line here, not a second traceback
        print(f"train: rank {world_from_env().rank} stopped: another rank failed ({str(e).splitlines()[0][:200]})",
              file=sys.stderr)
        return 1
    return 0


def lost_a_peer(e: BaseException) -> bool:
    """A collective that failed because another process went away (gloo, NCCL, the c10d store)."""
    import torch.distributed  # loaded already: the error came from a collective

    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "NCCL communicator was aborted"))




if __name__ == "__main__":
    exit_process(cli(sys.argv[1:]))
