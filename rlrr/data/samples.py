"""Samples out of shards: decoding (uint8 CHW RGB), reading a split where every sample counts or
skipping (and counting) unreadable training samples, the seeded generators every loader draws
from, and stacking resized samples into augmented uint8 batches, or packing them still encoded with
their augmentation drawn, to be decoded where the batch lands (``decode_packed``: nvJPEG on a GPU)."""
import io
import random
import sys
from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

try:  # libjpeg-turbo / libpng straight into a CHW tensor: PIL's pixels, about 3x faster (no RGB copy, no
    # HWC array, no transpose). torchvision has deprecated it in favour of torchcodec: PIL if it goes.
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
except ImportError:
    decode_image = None

from ..errors import DataError
from .fetch import ShardReader, ShardReadError
from .transforms import Draw, Recipe

IMAGE_KEYS = ("jpg", "png")


def _image_file(sample: dict) -> tuple[str, torch.Tensor]:
    """(extension, the image file's bytes as uint8) of a raw WebDataset sample."""
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no jpg/png image")
    return ext, torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8)


def decode(sample: dict) -> tuple[torch.Tensor, int, str]:
    """A raw WebDataset sample -> (uint8 CHW RGB image, label, key)."""
    ext, data = _image_file(sample)
    if decode_image is not None:
        image = decode_image(data, mode=ImageReadMode.RGB)
    else:
        with Image.open(io.BytesIO(sample[ext])) as pil:
            image = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous()
    return image, int(sample["cls"]), sample["__key__"]


class ImageFile(NamedTuple):
    data: torch.Tensor  # the file's bytes (uint8)
    jpeg: bool
    url: str  # the shard it came from, for the error naming it


def keep_encoded(sample: dict) -> tuple[ImageFile, int, str]:
    """A raw WebDataset sample -> (its image file, label, key), for decoding where the batch lands."""
    ext, data = _image_file(sample)
    return ImageFile(data, ext == "jpg", sample.get("__url__")), int(sample["cls"]), sample["__key__"]


def tar_samples(urls, reader: ShardReader, handler) -> Iterator[dict]:
    """webdataset's samples (``{"__key__", "__url__", "jpg"|"png", "cls"}``) of the shards at ``urls``,
    opened by ``reader``; ``handler`` as webdataset's: True skips what failed, else it raises."""
    files = wds.tariterators.tar_file_expander(reader.streams(urls, handler), handler=handler)
    return wds.tariterators.group_by_keys(files, handler=handler)


def _raise_naming_the_shard(exn: Exception) -> bool:
    raise DataError(f"unreadable shard: {exn}") from None  # webdataset appends " @ <shard>" to the message


def checked(item: tuple, num_classes: Optional[int], url: str):
    label = item[1]
    if num_classes is not None and not 0 <= label < num_classes:
        raise DataError(f"{url}: sample {item[2]}: label {label} outside 0..{num_classes - 1}")
    return item


def read_split(shards: list[str], reader: ShardReader, num_classes: Optional[int] = None,
               decoded: Callable = decode) -> Iterator[tuple]:
    """Every sample of ``shards``, in order; any unreadable part is a DataError naming the shard."""
    for sample in tar_samples(shards, reader, _raise_naming_the_shard):
        try:
            item = decoded(sample)
        except Exception as e:
            raise DataError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: cannot decode "
                            f"({type(e).__name__}: {e})") from None
        yield checked(item, num_classes, sample.get("__url__"))


def read_tolerant(samples, num_classes: Optional[int], skipped, decoded: Callable = decode) -> Iterator[tuple]:
    """Decode training samples, skipping (and counting in the shared ``skipped`` value) those that cannot
    be read: one bad image must not kill a rank, nor every restart after it."""
    for sample in samples:
        try:
            item = decoded(sample)
        except Exception as e:
            _skip(skipped, f"an unreadable training sample: {sample.get('__url__')} key {sample.get('__key__')} "
                           f"({type(e).__name__}: {str(e)[:200]})")
            continue
        yield checked(item, num_classes, sample.get("__url__"))


def _skip(skipped, what: str, count: int = 1) -> None:
    """Count a skip in the shared value (loader processes and this one) and say what was skipped."""
    with skipped.get_lock():
        skipped.value += count
    print(f"rlrr: skipped {what}", file=sys.stderr, flush=True)


def skip_broken_tar(skipped):
    """Training's handler: a shard that breaks off is skipped from there, one that cannot be fetched is
    skipped whole (its samples counted), and one whose bytes are not the manifest's ends the run."""
    def handler(exn: Exception) -> bool:
        if isinstance(exn, ShardReadError):
            if exn.changed:
                raise DataError(f"training shard {exn}") from None
            _skip(skipped, f"a training shard that could not be read: {exn}", exn.num_samples or 1)
        else:
            _skip(skipped, f"the rest of an unreadable training shard: {exn}")
        return True
    return handler


def seed_of(*parts) -> int:
    return random.Random(":".join(map(str, parts))).getrandbits(63)


def seeded_generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*parts))


def batches(items, batch_size: int, recipe: Recipe, generator, limit: Optional[int] = None, packed: bool = False):
    """Stack resized samples into uint8 batches and augment each batch, or (``packed``, for items of
    ``keep_encoded``) pack the batch's files with its augmentation drawn; a short last batch unless ``limit``."""
    chunk, n = [], 0
    make = _pack if packed else _stack
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield make(chunk, recipe, generator)
            chunk, n = [], n + 1
            if limit is not None and n == limit:
                return
    if chunk and limit is None:
        yield make(chunk, recipe, generator)


def _stack(chunk, recipe, generator):
    images, labels, keys = zip(*chunk)
    batch = recipe.augment(torch.stack([recipe.resize(x) for x in images]), generator)
    return batch, torch.tensor(labels), list(keys)


class Packed(NamedTuple):
    """A batch's image files end to end (one tensor to pass between processes, not one per image)."""
    data: torch.Tensor
    ends: torch.Tensor  # where each file ends in data
    jpeg: list  # per file: JPEG (decoded on the device) or not (PNG: decoded on the CPU, then moved)
    urls: list  # each file's shard
    draw: Draw  # the batch's augmentation, drawn as _stack draws it

    def files(self) -> list[torch.Tensor]:
        return list(self.data.tensor_split(self.ends[:-1].tolist()))


def _pack(chunk, recipe, generator):
    files, labels, keys = zip(*chunk)
    packed = Packed(torch.cat([f.data for f in files]), torch.tensor([len(f.data) for f in files]).cumsum(0),
                    [f.jpeg for f in files], [f.url for f in files], recipe.draw(len(files), generator))
    return packed, torch.tensor(labels), list(keys)


def _decode_file(data: torch.Tensor, jpeg: bool, device: torch.device) -> torch.Tensor:
    """One file: nvJPEG where it takes it, else the workers' decoder (PNG, or a JPEG nvJPEG refuses)."""
    if jpeg and device.type == "cuda":
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
    return decode_image(data, mode=ImageReadMode.RGB).to(device)


def decode_packed(batch, recipe: Recipe, device: torch.device, skipped=None):
    """A packed batch -> (uint8 NCHW images on ``device``, labels, keys), as ``_stack`` would have made it:
    the JPEGs decoded there in one call (nvJPEG on a GPU), resized and augmented there. Training
    (``skipped`` given) drops and counts an image that cannot be decoded (the batch is one shorter);
    evaluation raises a DataError naming it."""
    packed, labels, keys = batch
    files, jpeg = packed.files(), packed.jpeg
    images = [None] * len(files)
    at = [i for i, j in enumerate(jpeg) if j]
    if device.type == "cuda":  # nvJPEG writes its outputs without waiting for this stream, and the caching
        # allocator may hand it a block that queued kernels still read (pytorch/vision#9606): let them finish
        torch.cuda.current_stream(device).synchronize()
    try:
        decoded = decode_jpeg([files[i] for i in at], mode=ImageReadMode.RGB, device=device) if at else []
        for i, image in zip(at, decoded):
            images[i] = image
    except RuntimeError:
        pass  # one bad file fails the whole call: decoded one by one below, which names it
    for i in range(len(files)):
        if images[i] is None:
            try:
                images[i] = _decode_file(files[i], jpeg[i], device)
            except Exception as e:  # the messages of decoding in a loader worker (read_split, read_tolerant)
                why = f"({type(e).__name__}: {str(e)[:200]})"
                if skipped is None:
                    raise DataError(f"{packed.urls[i]}: sample {keys[i]}: cannot decode {why}") from None
                _skip(skipped, f"an unreadable training sample: {packed.urls[i]} key {keys[i]} {why}")
    kept = torch.tensor([image is not None for image in images], dtype=torch.bool)
    if not kept.any():
        raise DataError(f"{packed.urls[0]}: no decodable image in a training batch (keys {keys[0]} .. {keys[-1]})")
    out = recipe.apply(torch.stack([recipe.resize(x) for x in images if x is not None]), packed.draw.keep(kept))
    return out, labels[kept], [k for k, keep in zip(keys, kept.tolist()) if keep]
