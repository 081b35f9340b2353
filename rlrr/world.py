"""Where this process stands among the launcher's processes (torchrun's or SLURM's variables), and how
it leaves. Read before any process group exists, and without importing torch: a batch script's
``launch/train.py --print-run-dir`` needs no more than this and the config."""
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    """Where this process stands before any process group exists (read from the launcher's variables)."""
    rank: int = 0
    local_rank: int = 0  # its index on this node
    size: int = 1


def world_from_env() -> World:
    """torchrun's variables, else SLURM's (srun-native launch), else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return World(int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", 0)),
                     int(os.environ["SLURM_NTASKS"]))
    return World()


def restart_attempt() -> str:
    """Which start of the job this is: torchrun restarts and SLURM requeues both count."""
    return f"{os.environ.get('TORCHELASTIC_RESTART_COUNT') or 0}.{os.environ.get('SLURM_RESTART_COUNT') or 0}"


def exit_process(code: int) -> None:
    """Leave a command-line process. With a process group, gloo may abort (SIGABRT) in interpreter
    teardown after all the work is done, and torchrun would report the run as failed: meet the other
    ranks (after a success) and leave without the teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    dist = sys.modules.get("torch.distributed")  # never imported: no process group either
    if dist is not None and dist.is_initialized():
        if code == 0:
            dist.barrier()
        os._exit(code)
    sys.exit(code)
