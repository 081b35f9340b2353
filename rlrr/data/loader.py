"""One split's batches on this rank, from the shards written by ``tools/make_shards.py``: streamed
through loader processes (rlrr.data.streaming) or decoded once and held in memory
(rlrr.data.in_memory, for small splits such as VTAB-1k's).

Batches are ``(uint8 images NCHW, labels, keys)``; call ``transforms.normalize`` where they land. With
``decode_device`` the streaming workers pass the image files still encoded and this process decodes,
resizes and augments each batch on that device (nvJPEG on a GPU): the same batches as the workers make.
Training: the same number of batches on every rank, deterministic given the seed and the epoch.
Evaluation: every sample exactly once over all ranks, no padding and no duplicates.
"""
import math
from typing import Optional

import torch

from .in_memory import MemoryEpoch, load_split, train_indices
from .manifest import Manifest
from .samples import decode_image, decode_packed, seeded_generator
from .streaming import stream_loader, worker_context
from .transforms import Recipe


class SplitLoader:
    """Builds each epoch's batches for one split on this rank. ``len()`` is the batches per epoch
    (training: equal on every rank)."""

    def __init__(self, manifest: Manifest, split: str, *, train: bool, batch_size: int, recipe: Recipe,
                 rank: int = 0, world: int = 1, workers: int = 2, seed: int = 0, in_memory: bool = False,
                 shuffle_buffer: int = 1000, device: Optional[torch.device] = None,
                 decode_device: Optional[torch.device] = None):
        self.split, self.reader = manifest.split(split), manifest.reader()
        self.num_classes = manifest.num_classes
        self.train, self.batch_size, self.recipe, self.in_memory = train, batch_size, recipe, in_memory
        self.rank, self.world, self.workers, self.seed, self.shuffle_buffer = rank, world, workers, seed, shuffle_buffer
        self.decode_device = None if in_memory else decode_device  # an in-memory split is decoded once, here
        if self.decode_device is not None and decode_image is None:
            raise ValueError("data.decode = device needs torchvision's image decoders (torchvision.io)")
        # training samples skipped as unreadable, counted across this rank's loader processes
        self.skipped = worker_context().Value("i", 0) if train else None
        self._stream, self.per_worker = None, 0
        # streamed batches land in pinned memory for a GPU: copied there without waiting for it
        self.pin_memory = device is not None and device.type == "cuda"
        if train:
            if self.split.num_samples == 0:
                raise ValueError(f"split {split} of {manifest.path} is empty")
            steps = math.ceil(self.split.num_samples / (world * batch_size))
            # in memory: exactly `steps`; streaming: each worker yields the same share, rounded up
            self.per_worker = math.ceil(steps / max(1, workers))
            self.num_batches = steps if in_memory else self.per_worker * max(1, workers)
        if in_memory:
            self.images, self.labels, self.keys = load_split(self.split, self.reader, recipe, self.num_classes,
                                                             self.skipped)
            if device is not None:  # e.g. the GPU: batches are gathered and augmented there, no copy per step
                self.images, self.labels = self.images.to(device), self.labels.to(device)

    def __len__(self):
        if self.train:
            return self.num_batches
        if self.in_memory:
            return math.ceil(len(range(self.rank, self.split.num_samples, self.world)) / self.batch_size)
        raise TypeError("a streaming eval loader has no fixed length per rank")

    def close(self) -> None:
        """Stop this split's loader processes now; the loader starts new ones if iterated again. Left to
        the garbage collector, a loader whose worker raised (its iterator then held by a traceback's
        reference cycle) is collected after multiprocessing's queues were closed, and waits 5 s for each
        worker before killing it."""
        stream, self._stream = self._stream, None
        iterator = getattr(stream, "_iterator", None)  # torch's DataLoader keeps its persistent workers' iterator
        if iterator is not None:
            iterator._shutdown_workers()

    def take_skipped(self) -> int:
        """Training samples skipped as unreadable since the last call."""
        with self.skipped.get_lock():
            n, self.skipped.value = self.skipped.value, 0
        return n

    def epoch(self, epoch: int):
        """An iterable over the epoch's batches."""
        return self._memory_epoch(epoch) if self.in_memory else self._stream_epoch(epoch)

    def _memory_epoch(self, epoch: int) -> MemoryEpoch:
        if self.train:
            indices = train_indices(len(self.labels), self.num_batches, self.batch_size, self.rank, self.world,
                                    self.seed, epoch)
            augment = seeded_generator(self.seed, epoch, self.rank, "augment")
        else:
            indices, augment = torch.arange(self.rank, self.split.num_samples, self.world), None
        return MemoryEpoch(self.images, self.labels, self.keys, indices, self.batch_size, self.recipe, augment)

    def _stream_epoch(self, epoch: int):
        if self._stream is None:
            self._stream = stream_loader(self.split, self.reader, train=self.train, batch_size=self.batch_size,
                                         recipe=self.recipe, rank=self.rank, world=self.world, workers=self.workers,
                                         seed=self.seed,
                                         num_classes=self.num_classes, per_worker=self.per_worker,
                                         shuffle_buffer=self.shuffle_buffer, skipped=self.skipped,
                                         packed=self.decode_device is not None, pin_memory=self.pin_memory)
        if self.train:
            self._stream.dataset.epoch_box.value = epoch  # read by the workers when the epoch starts
        if self.decode_device is None:
            return self._stream
        return (decode_packed(batch, self.recipe, self.decode_device, self.skipped) for batch in self._stream)
