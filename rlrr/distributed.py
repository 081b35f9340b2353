"""Process-group set-up for one process, torchrun (env://) and SLURM srun (one task per GPU)."""
import os
import resource
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .world import restart_attempt, world_from_env


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_initialized() and self.world > 1


def init_distributed(always: bool = False, timeout_s: float = 900) -> DistInfo:
    """Join the process group (also for a single process when ``always``). ``timeout_s`` bounds the
    rendezvous and every collective, so a lost peer ends the run instead of hanging it.

    The group's keys live under a prefix per restart attempt: torchrun keeps its store across
    restarts, and a restarted rank could otherwise read the address a dead rank published in the
    previous attempt and fail to connect (or wait for it)."""
    w = world_from_env()
    rank, local_rank, world = w.rank, w.local_rank, w.size
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world > 1 or always) and not dist.is_initialized():
        # srun-native: torch's env:// rendezvous reads these; MASTER_ADDR/PORT come from the batch script
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000) if world == 1 else "29500")
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        store = dist.PrefixStore(f"rlrr/attempt-{restart_attempt()}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistInfo(rank, local_rank, world, device)


def broadcast_object(info: DistInfo, obj):
    """Rank 0's value on every rank (run names, resume paths: rank 0 decides)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def status_mb(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now, VmHWM: peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def gather_object(info: DistInfo, obj) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(info: DistInfo, tensor: torch.Tensor) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_over_ranks(info: DistInfo, values: list[float]) -> list[float]:
    """Host numbers (flags, counts) summed over every rank, in one small all-reduce (float64: counts below
    2**53 stay exact); in one process the numbers themselves, with no trip through the device (each
    read back from a GPU waits for it)."""
    if not info.enabled:
        return [float(v) for v in values]
    return all_reduce_sum(info, torch.tensor(values, dtype=torch.float64, device=info.device)).tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
