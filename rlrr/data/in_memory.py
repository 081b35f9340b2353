"""A split decoded once and kept as one uint8 tensor (on the GPU in CUDA runs): each training epoch
is a seeded permutation, batched and augmented in this process; in evaluation rank r takes samples
r::world, every sample exactly once."""
import math

import torch

from ..errors import DataError
from .fetch import ShardReader
from .manifest import Split
from .samples import read_split, read_tolerant, seeded_generator, skip_broken_tar, tar_samples
from .transforms import Recipe, host_to


def load_split(split: Split, reader: ShardReader, recipe: Recipe, num_classes: int, skipped=None
               ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(images, labels, keys) of every sample, resized. Training (``skipped`` given) skips and counts
    unreadable samples; evaluation needs every one the manifest lists."""
    if skipped is not None:
        raw = tar_samples(split.shards, reader, skip_broken_tar(skipped))
        items = read_tolerant(raw, num_classes, skipped)
    else:
        items = read_split(split.shards, reader, num_classes)
    images, labels, keys = [], [], []
    for image, label, key in items:
        images.append(recipe.resize(image))
        labels.append(label)
        keys.append(key)
    if not images:
        raise DataError(f"split {split.name}: no readable sample in {len(split.shards)} shard(s)")
    if skipped is None and len(images) != split.num_samples:
        raise DataError(f"split {split.name}: read {len(images)} samples, manifest says {split.num_samples}")
    return torch.stack(images), torch.tensor(labels), keys


def train_indices(num_samples: int, num_batches: int, batch_size: int, rank: int, world: int, seed: int,
                  epoch: int) -> torch.Tensor:
    """One permutation for all ranks; rank r takes every world-th index, wrapped to equal length."""
    order = torch.randperm(num_samples, generator=seeded_generator(seed, epoch))
    need = num_batches * batch_size * world
    return order.repeat(math.ceil(need / len(order)))[:need][rank::world]


class MemoryEpoch:
    """One epoch over in-memory uint8 tensors, batched in this process."""

    def __init__(self, images, labels, keys, indices, batch_size, recipe, generator):
        self.images, self.labels, self.keys, self.indices = images, labels, keys, indices
        self.batch_size, self.recipe, self.generator = batch_size, recipe, generator

    def __len__(self):
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        on_device = host_to(self.indices, self.images.device)  # once an epoch, not once a batch
        for start in range(0, len(self.indices), self.batch_size):
            idx = on_device[start:start + self.batch_size]
            yield (self.recipe.augment(self.images[idx], self.generator), self.labels[idx],
                   [self.keys[i] for i in self.indices[start:start + self.batch_size].tolist()])
