"""Streaming a split from its shards through DataLoader worker processes.

Train: every epoch has the same number of batches on every rank (DDP needs it). Shards are
permuted with (seed, epoch), split by rank, then by worker; a worker whose shards run out tops up by
resampling shards, so each yields a fixed count. A shuffle buffer mixes samples. Deterministic given
seed and epoch.

Eval: shard i goes to exactly one (rank, worker) pair, and every sample is seen exactly once: no
padding, no duplicates (a short last batch instead).

``packed``: workers pass each batch's image files still encoded, with its augmentation drawn
(samples.Packed), for the training process to decode on its device (data.decode: device).
"""
import functools
import multiprocessing
import os
import random
import threading
import time
from typing import Iterator

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .samples import (
    batches,
    decode,
    keep_encoded,
    read_split,
    read_tolerant,
    seed_of,
    seeded_generator,
    skip_broken_tar,
    tar_samples,
)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(IterableDataset):
    """Fixed-length, resampled-on-exhaustion, shuffled stream of training batches for one rank."""

    def __init__(self, shards, reader, batches_per_worker, batch_size, recipe, rank, world, seed, epoch, buffer=1000,
                 num_classes=None, skipped=None, packed=False):
        self.shards, self.reader, self.batches_per_worker, self.packed = shards, reader, batches_per_worker, packed
        self.batch_size, self.recipe = batch_size, recipe
        self.rank, self.world, self.seed, self.buffer = rank, world, seed, buffer
        self.epoch_box = epoch  # a shared Value: persistent workers read the current epoch at each __iter__
        self.num_classes, self.skipped = num_classes, skipped

    @property
    def epoch(self) -> int:
        return self.epoch_box.value

    def _urls(self, worker: int, num_workers: int) -> Iterator[str]:
        order = list(self.shards)
        random.Random(seed_of(self.seed, self.epoch, "shards")).shuffle(order)  # the same on every rank
        yield from order[self.rank::self.world][worker::num_workers]
        rng = random.Random(seed_of(self.seed, self.epoch, self.rank, worker, "resample"))
        while True:
            yield rng.choice(self.shards)

    def __iter__(self):
        worker, num_workers = _worker()
        rng = random.Random(seed_of(self.seed, self.epoch, self.rank, worker, "buffer"))
        samples = wds.shuffle(self.buffer, self.buffer // 4, rng=rng)(
            tar_samples(self._urls(worker, num_workers), self.reader, skip_broken_tar(self.skipped)))
        augment = seeded_generator(self.seed, self.epoch, self.rank, worker, "augment")
        items = read_tolerant(samples, self.num_classes, self.skipped, keep_encoded if self.packed else decode)
        yield from batches(items, self.batch_size, self.recipe, augment, self.batches_per_worker, self.packed)


class EvalStream(IterableDataset):
    """Each shard read by exactly one (rank, worker); every sample exactly once."""

    def __init__(self, shards, reader, batch_size, recipe, rank, world, num_classes=None, packed=False):
        self.shards, self.reader, self.batch_size, self.recipe = shards, reader, batch_size, recipe
        self.rank, self.world = rank, world
        self.num_classes, self.packed = num_classes, packed

    def __iter__(self):
        worker, num_workers = _worker()
        mine = self.shards[self.rank::self.world][worker::num_workers]
        items = read_split(mine, self.reader, self.num_classes, keep_encoded if self.packed else decode)
        yield from batches(items, self.batch_size, self.recipe, None, packed=self.packed)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] not in ("Z", "X")  # a zombie has died
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: signal 0 only asks whether the process exists
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _exit_with(trainer: int, worker_id: int) -> None:
    """worker_init_fn: end this loader process once the training process is gone (killed, crashed).
    A forkserver's children cannot see that themselves: their parent is the forkserver, which in turn
    lives as long as any of them holds its liveness pipe."""
    def watch():
        while _alive(trainer):
            time.sleep(1.0)
        os._exit(0)
    threading.Thread(target=watch, daemon=True, name="rlrr-trainer-watch").start()


@functools.cache
def worker_context():
    """Loader workers come from a forkserver: forked from a clean single-threaded process that has
    imported this module once, never from the training process, whose other threads (TensorBoard's
    writer, tqdm's monitor, queue feeders) may hold a lock at the moment of a fork and leave the
    child deadlocked. Workers are persistent: each split's start once per run."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["rlrr.data.worker_start"])
    return ctx


def stream_loader(split, reader, *, train: bool, batch_size: int, recipe, rank: int, world: int, workers: int,
                  seed: int, num_classes: int, per_worker: int = 0, shuffle_buffer: int = 1000,
                  skipped=None, packed: bool = False, pin_memory: bool = False) -> DataLoader:
    """The split's DataLoader, made once per run: its worker processes start once, not per epoch. For
    training, set ``loader.dataset.epoch_box.value`` to the epoch before iterating it."""
    if train:
        stream = TrainStream(split.shards, reader, per_worker, batch_size, recipe, rank, world, seed,
                             worker_context().Value("q", 0), shuffle_buffer, num_classes, skipped, packed)
    else:
        stream = EvalStream(split.shards, reader, batch_size, recipe, rank, world, num_classes, packed)
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=pin_memory,
                      worker_init_fn=functools.partial(_exit_with, os.getpid()),
                      # its own seed stream: drawing from the global one would shift the model's dropout on
                      # every epoch and evaluation, so that a resumed run (fewer loaders made) would train
                      # differently
                      generator=seeded_generator(seed, rank, split.name, "loader"),
                      multiprocessing_context=worker_context() if workers else None)
