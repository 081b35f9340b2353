"""Source datasets -> {split: [(image, label)]}: VTAB-1k folders, VPT FGVC json, image folders, IDX.

``image`` is a file path or a uint8 array (IDX). Problems with the listing itself (missing files,
bad labels) raise ``DatasetError`` naming the first offenders before any image is read.
"""
import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Union

import numpy as np

Image = Union[str, np.ndarray]
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
FGVC_SPLITS = ("train", "val", "trainval", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_SHOW = 5


class DatasetError(ValueError):
    pass


@dataclass
class Source:
    name: str
    class_names: list[str]
    splits: dict[str, list[tuple[Image, int]]]
    label_map: dict = field(default_factory=dict)  # original id -> contiguous id, where remapped


def _offenders(what: str, items: list[str]) -> DatasetError:
    more = f" ... ({len(items)} in all)" if len(items) > _SHOW else ""
    return DatasetError(f"{what}: {', '.join(items[:_SHOW])}{more}")


def _check_files_exist(splits: dict[str, list[tuple[Image, int]]]) -> None:
    missing = sorted({p for items in splits.values() for p, _ in items if not os.path.isfile(p)})
    if missing:
        raise _offenders(f"{len(missing)} image file(s) not found", missing)


def _check_labels(splits, num_classes: int, where: str) -> None:
    bad = [f"{split}: {label}" for split, items in splits.items() for _, label in items
           if not 0 <= label < num_classes]
    if bad:
        raise _offenders(f"{where}: label(s) outside [0, {num_classes})", sorted(set(bad)))


def read_vtab(root: str, num_classes=None) -> Source:
    splits = {}
    for split in VTAB_SPLITS:
        listing = os.path.join(root, f"{split}.txt")
        if not os.path.isfile(listing):
            continue
        items = []
        with open(listing) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise DatasetError(f"{listing}:{n}: expected 'relative/path label', got {line.strip()!r}")
                items.append((os.path.join(root, parts[0]), int(parts[1])))
        splits[split] = items
    if not splits:
        expected = ", ".join(s + ".txt" for s in VTAB_SPLITS)
        raise DatasetError(f"{root}: no VTAB-1k split listing found (expected {expected})")
    _check_files_exist(splits)
    num_classes = num_classes or 1 + max(label for items in splits.values() for _, label in items)
    _check_labels(splits, num_classes, root)
    return Source(os.path.basename(os.path.normpath(root)), [str(i) for i in range(num_classes)], splits)


def read_fgvc(root: str, num_classes=None) -> Source:
    raw = {}
    for split in FGVC_SPLITS:
        listing = os.path.join(root, f"{split}.json")
        if os.path.isfile(listing):
            with open(listing) as f:
                try:
                    raw[split] = json.load(f)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{listing}: not valid JSON ({e})") from None
            if not isinstance(raw[split], dict):
                raise DatasetError(f"{listing}: expected an object mapping image path -> class id")
    if not raw:
        raise DatasetError(f"{root}: no FGVC split file found (expected {', '.join(s + '.json' for s in FGVC_SPLITS)})")
    first = next(iter(next(iter(raw.values()))), "")
    # CUB and NABirds list paths relative to images/, the other VPT datasets relative to the root
    image_root = os.path.join(root, "images") if (
        not os.path.isfile(os.path.join(root, first)) and os.path.isfile(os.path.join(root, "images", first))) else root
    bad = [f"{s}: {p} -> {c!r}" for s, d in raw.items() for p, c in d.items() if not str(c).lstrip("-").isdigit()]
    if bad:
        raise _offenders(f"{root}: class id(s) that are not integers", bad)
    # one contiguous mapping over the union of all splits (the reference remaps per split: a bug)
    original = sorted({int(c) for d in raw.values() for c in d.values()})
    label_map = {c: i for i, c in enumerate(original)}
    splits = {s: [(os.path.join(image_root, p), label_map[int(c)]) for p, c in sorted(d.items())]
              for s, d in raw.items()}
    if "trainval" not in splits and {"train", "val"} <= set(splits):  # VPT trains the final model on both
        splits["trainval"] = splits["train"] + splits["val"]
    _check_files_exist(splits)
    if num_classes is not None and len(original) > num_classes:
        raise DatasetError(f"{root}: {len(original)} distinct class ids but --num-classes {num_classes}")
    return Source(os.path.basename(os.path.normpath(root)), [str(c) for c in original], splits, label_map)


def read_imagefolder(root: str, num_classes=None) -> Source:
    entries = os.listdir(root) if os.path.isdir(root) else []
    split_dirs = sorted(d for d in entries if os.path.isdir(os.path.join(root, d)))
    if not split_dirs:
        raise DatasetError(f"{root}: expected <root>/<split>/<class>/<image> folders")
    classes = sorted({c for s in split_dirs for c in os.listdir(os.path.join(root, s))
                      if os.path.isdir(os.path.join(root, s, c))})
    if num_classes is not None and len(classes) > num_classes:
        raise DatasetError(f"{root}: {len(classes)} class folders but --num-classes {num_classes}")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for s in split_dirs:
        items = []
        for c in sorted(os.listdir(os.path.join(root, s))):
            folder = os.path.join(root, s, c)
            if os.path.isdir(folder):
                items += [(os.path.join(folder, f), index[c]) for f in sorted(os.listdir(folder))
                          if f.lower().endswith(IMAGE_EXTENSIONS)]
        splits[s] = items
    return Source(os.path.basename(os.path.normpath(root)), classes, splits)


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: IDX header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def read_idx(root: str, num_classes=None) -> Source:
    """MNIST-style files: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] -> splits train, test."""
    splits = {}
    for prefix, split in (("train", "train"), ("t10k", "test")):
        found = {}
        for kind in ("images-idx3", "labels-idx1"):
            for suffix in ("-ubyte.gz", "-ubyte"):
                path = os.path.join(root, f"{prefix}-{kind}{suffix}")
                if os.path.isfile(path):
                    found[kind] = path
                    break
        if len(found) == 2:
            images, labels = _read_idx(found["images-idx3"]), _read_idx(found["labels-idx1"])
            if len(images) != len(labels):
                raise DatasetError(f"{found['images-idx3']}: {len(images)} images but {len(labels)} labels")
            splits[split] = [(images[i], int(labels[i])) for i in range(len(labels))]
    if not splits:
        raise DatasetError(f"{root}: no IDX files found (expected train-images-idx3-ubyte.gz and "
                           "train-labels-idx1-ubyte.gz, or t10k-*)")
    num_classes = num_classes or 1 + max(label for items in splits.values() for _, label in items)
    _check_labels(splits, num_classes, root)
    return Source(os.path.basename(os.path.normpath(root)), [str(i) for i in range(num_classes)], splits)


READERS = {"vtab": read_vtab, "fgvc": read_fgvc, "imagefolder": read_imagefolder, "idx": read_idx}
