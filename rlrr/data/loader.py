"""Train and eval input pipelines over the shards written by ``tools/make_shards.py``.

Batches are ``(uint8 images NCHW, labels, keys)``; call ``transforms.normalize`` where they land.

Train: every epoch has the same number of batches on every rank (DDP needs it). Shards are
permuted with (seed, epoch), split by rank, then by worker; a worker whose shards run out tops up by
resampling shards, so each yields a fixed count. A shuffle buffer mixes samples. Deterministic given
seed and epoch. Small splits can instead be decoded once and kept in memory as one uint8 tensor
(``in_memory``): each epoch is then a seeded permutation, batched in this process.

Eval: shard i goes to exactly one (rank, worker) pair, and every sample is seen exactly once: no
padding, no duplicates (a short last batch instead). In memory, rank r takes samples r::world.
"""
import functools
import io
import json
import math
import multiprocessing
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

try:  # libjpeg-turbo / libpng straight into a CHW tensor: PIL's pixels, about 3x faster (no RGB copy, no
    # HWC array, no transpose). torchvision has deprecated it in favour of torchcodec: PIL if it goes.
    from torchvision.io import ImageReadMode, decode_image
except ImportError:
    decode_image = None

from .shards import MANIFEST_FORMAT, sha256_file
from .transforms import Recipe

IMAGE_KEYS = ("jpg", "png")


@dataclass
class Split:
    name: str
    shards: list[str]  # absolute paths
    num_samples: int


class ManifestError(ValueError):
    """A shard manifest that is missing, unreadable, or asks for something it does not hold."""


class DataError(ValueError):
    """A shard that cannot be read where every sample counts (evaluation), or a label out of range.

    Raised in a loader worker, it reaches the trainer rebuilt by torch from the worker's traceback
    text (``DataError("Caught DataError in DataLoader worker ...")``): its message is then that text's
    last line, so ``str(e)`` is the same one line wherever it was raised."""

    def __init__(self, message: str):
        if message.startswith("Caught DataError"):
            message = message.strip().splitlines()[-1].removeprefix(f"{__name__}.DataError: ")
        super().__init__(message)


class Manifest:
    def __init__(self, path: str):
        self.path = path if path.endswith(".json") else os.path.join(path, "manifest.json")
        self.root = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isfile(self.path):
            raise ManifestError(f"shard manifest not found: {self.path} (make it with tools/make_shards.py)")
        try:
            with open(self.path) as f:
                self.data = json.load(f)
        except (OSError, ValueError) as e:
            raise ManifestError(f"{self.path}: not a readable manifest ({e})") from None
        if not isinstance(self.data, dict) or self.data.get("format") != MANIFEST_FORMAT:
            found = self.data.get("format") if isinstance(self.data, dict) else None
            raise ManifestError(f"{self.path}: format {found!r}, expected {MANIFEST_FORMAT!r}")
        self.num_classes = int(self.data["num_classes"])
        self.class_names = list(self.data["class_names"])

    def split(self, name: str) -> Split:
        splits = self.data["splits"]
        if name not in splits:
            raise ManifestError(f"{self.path}: no split {name!r}; splits are {sorted(splits)}")
        s = splits[name]
        return Split(name, [self._inside(x["path"]) for x in s["shards"]], int(s["num_samples"]))

    def verify(self, splits: list[str], max_bytes: Optional[int] = None) -> int:
        """Check the sha256 of every shard of ``splits`` against the manifest; returns the bytes read,
        0 if they add up to more than ``max_bytes``. A mismatch is a ManifestError naming the shard."""
        shards = {x["path"]: x for name in splits for x in self.data["splits"][name]["shards"]}
        paths = {rel: self._inside(rel) for rel in shards}
        total = sum(os.path.getsize(p) for p in paths.values() if os.path.exists(p))
        if max_bytes is not None and total > max_bytes:
            return 0
        for rel, path in paths.items():
            expected = shards[rel].get("sha256")
            if not os.path.isfile(path):
                raise ManifestError(f"{path}: shard missing")
            digest = sha256_file(path)
            if expected and digest != expected:
                raise ManifestError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                                    f"{expected[:12]}...: the shard is damaged; copy or make it again")
        return total

    def _inside(self, rel: str) -> str:
        """A shard path of the manifest, which must stay inside the manifest's folder."""
        path = os.path.normpath(os.path.join(self.root, rel))
        if os.path.isabs(rel) or os.path.commonpath([path, self.root]) != self.root:
            raise ManifestError(f"{self.path}: shard path {rel!r} leaves the manifest's folder")
        return path


def decode(sample: dict) -> tuple[torch.Tensor, int, str]:
    """A raw WebDataset sample -> (uint8 CHW RGB image, label, key)."""
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no jpg/png image")
    if decode_image is not None:
        image = decode_image(torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    else:
        with Image.open(io.BytesIO(sample[ext])) as pil:
            image = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous()
    return image, int(sample["cls"]), sample["__key__"]


def _raise_naming_the_shard(exn: Exception) -> bool:
    raise DataError(f"unreadable shard: {exn}") from None  # webdataset appends " @ <shard>" to the message


def checked(item: tuple[torch.Tensor, int, str], num_classes: Optional[int], url: str):
    label = item[1]
    if num_classes is not None and not 0 <= label < num_classes:
        raise DataError(f"{url}: sample {item[2]}: label {label} outside 0..{num_classes - 1}")
    return item


def read_split(shards: list[str], num_classes: Optional[int] = None) -> Iterator[tuple[torch.Tensor, int, str]]:
    """Every sample of ``shards``, in order; any unreadable part is a DataError naming the shard."""
    for sample in wds.tarfile_samples(({"url": u} for u in shards), handler=_raise_naming_the_shard):
        try:
            item = decode(sample)
        except Exception as e:
            raise DataError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: cannot decode "
                            f"({type(e).__name__}: {e})") from None
        yield checked(item, num_classes, sample.get("__url__"))


def read_tolerant(samples, num_classes: Optional[int], skipped) -> Iterator[tuple[torch.Tensor, int, str]]:
    """Decode training samples, skipping (and counting in the shared ``skipped`` value) those that cannot
    be read: one bad image must not kill a rank, nor every restart after it."""
    for sample in samples:
        try:
            item = decode(sample)
        except Exception as e:
            _skip(skipped, f"an unreadable training sample: {sample.get('__url__')} key {sample.get('__key__')} "
                           f"({type(e).__name__}: {str(e)[:200]})")
            continue
        yield checked(item, num_classes, sample.get("__url__"))


def _skip(skipped, what: str) -> None:
    """Count a skip in the shared value (loader processes and this one) and say what was skipped."""
    with skipped.get_lock():
        skipped.value += 1
    print(f"rlrr: skipped {what}", file=sys.stderr, flush=True)


def _skip_broken_tar(skipped):
    def handler(exn: Exception) -> bool:
        _skip(skipped, f"the rest of an unreadable training shard: {exn}")
        return True
    return handler


def _seed(*parts) -> int:
    return random.Random(":".join(map(str, parts))).getrandbits(63)


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _batches(items, batch_size: int, recipe: Recipe, generator, limit: Optional[int] = None):
    """Stack resized samples into uint8 batches and augment each batch; a short last batch unless ``limit``."""
    chunk, n = [], 0
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield _stack(chunk, recipe, generator)
            chunk, n = [], n + 1
            if limit is not None and n == limit:
                return
    if chunk and limit is None:
        yield _stack(chunk, recipe, generator)


def _stack(chunk, recipe, generator):
    images, labels, keys = zip(*chunk)
    batch = recipe.augment(torch.stack([recipe.resize(x) for x in images]), generator)
    return batch, torch.tensor(labels), list(keys)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(IterableDataset):
    """Fixed-length, resampled-on-exhaustion, shuffled stream of training batches for one rank."""

    def __init__(self, shards, batches_per_worker, batch_size, recipe, rank, world, seed, epoch, buffer=1000,
                 num_classes=None, skipped=None):
        self.shards, self.batches_per_worker = shards, batches_per_worker
        self.batch_size, self.recipe = batch_size, recipe
        self.rank, self.world, self.seed, self.buffer = rank, world, seed, buffer
        self.epoch_box = epoch  # a shared Value: persistent workers read the current epoch at each __iter__
        self.num_classes, self.skipped = num_classes, skipped

    @property
    def epoch(self) -> int:
        return self.epoch_box.value

    def _urls(self, worker: int, num_workers: int) -> Iterator[str]:
        order = list(self.shards)
        random.Random(_seed(self.seed, self.epoch, "shards")).shuffle(order)  # the same on every rank
        yield from order[self.rank::self.world][worker::num_workers]
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, "resample"))
        while True:
            yield rng.choice(self.shards)

    def __iter__(self):
        worker, num_workers = _worker()
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, "buffer"))
        samples = wds.shuffle(self.buffer, self.buffer // 4, rng=rng)(
            wds.tarfile_samples(({"url": u} for u in self._urls(worker, num_workers)),
                                handler=_skip_broken_tar(self.skipped)))
        yield from _batches(read_tolerant(samples, self.num_classes, self.skipped), self.batch_size, self.recipe,
                            _generator(self.seed, self.epoch, self.rank, worker, "augment"), self.batches_per_worker)


class EvalStream(IterableDataset):
    """Each shard read by exactly one (rank, worker); every sample exactly once."""

    def __init__(self, shards, batch_size, recipe, rank, world, num_classes=None):
        self.shards, self.batch_size, self.recipe, self.rank, self.world = shards, batch_size, recipe, rank, world
        self.num_classes = num_classes

    def __iter__(self):
        worker, num_workers = _worker()
        mine = self.shards[self.rank::self.world][worker::num_workers]
        yield from _batches(read_split(mine, self.num_classes), self.batch_size, self.recipe, None)


class _MemoryEpoch:
    """One epoch over in-memory uint8 tensors, batched in this process."""

    def __init__(self, images, labels, keys, indices, batch_size, recipe, generator):
        self.images, self.labels, self.keys, self.indices = images, labels, keys, indices
        self.batch_size, self.recipe, self.generator = batch_size, recipe, generator

    def __len__(self):
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start:start + self.batch_size]
            on_device = idx.to(self.images.device)
            yield (self.recipe.augment(self.images[on_device], self.generator), self.labels[on_device],
                   [self.keys[i] for i in idx.tolist()])


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
    ctx.set_forkserver_preload([__name__])
    return ctx


class SplitLoader:
    """Builds each epoch's batches for one split on this rank. ``len()`` is the batches per epoch
    (train: equal on every rank)."""

    def __init__(self, manifest: Manifest, split: str, *, train: bool, batch_size: int, recipe: Recipe,
                 rank: int = 0, world: int = 1, workers: int = 2, seed: int = 0, in_memory: bool = False,
                 shuffle_buffer: int = 1000, device: Optional[torch.device] = None):
        self.split = manifest.split(split)
        self.num_classes = manifest.num_classes
        self._stream_loader = None
        # training samples skipped as unreadable, counted across this rank's loader processes
        self.skipped = worker_context().Value("i", 0) if train else None
        self.train, self.batch_size, self.recipe = train, batch_size, recipe
        self.rank, self.world, self.workers, self.seed, self.shuffle_buffer = rank, world, workers, seed, shuffle_buffer
        self.in_memory = in_memory
        if train:
            if self.split.num_samples == 0:
                raise ValueError(f"split {split} of {manifest.path} is empty")
            steps = math.ceil(self.split.num_samples / (world * batch_size))
            # in memory: exactly `steps`; streaming: each worker yields the same share, rounded up
            self.per_worker = math.ceil(steps / max(1, workers))
            self.num_batches = steps if in_memory else self.per_worker * max(1, workers)
        if in_memory:
            self._load()
            if device is not None:  # e.g. the GPU: batches are gathered and augmented there, no copy per step
                self.images, self.labels = self.images.to(device), self.labels.to(device)

    def _load(self):
        if self.train:
            raw = wds.tarfile_samples(({"url": u} for u in self.split.shards), handler=_skip_broken_tar(self.skipped))
            items = read_tolerant(raw, self.num_classes, self.skipped)
        else:
            items = read_split(self.split.shards, self.num_classes)
        images, labels, keys = [], [], []
        for image, label, key in items:
            images.append(self.recipe.resize(image))
            labels.append(label)
            keys.append(key)
        if not images:
            raise DataError(f"split {self.split.name}: no readable sample in {len(self.split.shards)} shard(s)")
        if not self.train and len(images) != self.split.num_samples:
            raise DataError(f"split {self.split.name}: read {len(images)} samples, manifest says "
                            f"{self.split.num_samples}")
        self.images, self.labels, self.keys = torch.stack(images), torch.tensor(labels), keys

    def __len__(self):
        if self.train:
            return self.num_batches
        if self.in_memory:
            return math.ceil(len(range(self.rank, self.split.num_samples, self.world)) / self.batch_size)
        raise TypeError("a streaming eval loader has no fixed length per rank")

    def take_skipped(self) -> int:
        """Training samples skipped as unreadable since the last call."""
        with self.skipped.get_lock():
            n, self.skipped.value = self.skipped.value, 0
        return n

    def epoch(self, epoch: int):
        if self.in_memory:
            if self.train:
                # one permutation for all ranks; rank r takes every world-th index, wrapped to equal length
                order = torch.randperm(len(self.labels), generator=_generator(self.seed, epoch))
                need = self.num_batches * self.batch_size * self.world
                indices = order.repeat(math.ceil(need / len(order)))[:need][self.rank::self.world]
                gen = _generator(self.seed, epoch, self.rank, "augment")
            else:
                indices, gen = torch.arange(self.rank, self.split.num_samples, self.world), None
            return _MemoryEpoch(self.images, self.labels, self.keys, indices, self.batch_size, self.recipe, gen)
        if self._stream_loader is None:  # made once: its worker processes start once per run, not per epoch
            if self.train:
                stream = TrainStream(self.split.shards, self.per_worker, self.batch_size, self.recipe, self.rank,
                                     self.world, self.seed, worker_context().Value("q", 0), self.shuffle_buffer,
                                     self.num_classes, self.skipped)
            else:
                stream = EvalStream(self.split.shards, self.batch_size, self.recipe, self.rank, self.world,
                                    self.num_classes)
            self._stream_loader = DataLoader(stream, batch_size=None, num_workers=self.workers,
                                             persistent_workers=self.workers > 0,
                                             worker_init_fn=functools.partial(_exit_with, os.getpid()),
                                             # its own seed stream: drawing from the global one would shift
                                             # the model's dropout on every epoch and evaluation, so that a
                                             # resumed run (fewer loaders made) would train differently
                                             generator=_generator(self.seed, self.rank, self.split.name, "loader"),
                                             multiprocessing_context=worker_context() if self.workers else None)
        if self.train:
            self._stream_loader.dataset.epoch_box.value = epoch  # read by the workers when the epoch starts
        return self._stream_loader
