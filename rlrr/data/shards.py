"""Write a source dataset as WebDataset shards plus ``manifest.json``.

Layout: ``DST/<split>/<split>-%06d.tar`` (members ``<key>.jpg|png`` and ``<key>.cls``) and
``DST/manifest.json`` (class names, per-split and per-shard counts, sha256, preprocessing, skipped
images). Deterministic: the same input and options give the same bytes. Written into a temporary
folder beside DST and renamed into place, so DST is never half-written.
"""
import io
import json
import math
import os
import random
import shutil
import tempfile
from multiprocessing import Pool
from typing import Optional

import numpy as np
import webdataset as wds
from PIL import Image as PILImage
from tqdm import tqdm

from .manifest import MANIFEST_FORMAT, sha256_file
from .sources import DatasetError, Source

JPEG_QUALITY = 95


def shard_resize(pil: "PILImage.Image", image_size: int, resize: str) -> "PILImage.Image":
    """The shards' resize (bicubic): ``square`` to image_size x image_size (what the VTAB/FGVC recipes
    do first: aspect ratio not kept), or ``shorter`` side to image_size. Inference repeats it on files."""
    if resize == "square":
        size = (image_size, image_size)
    else:
        scale = image_size / min(pil.size)
        size = (max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale)))
    return pil if pil.size == size else pil.resize(size, PILImage.BICUBIC)


def _encode(job: tuple) -> tuple[Optional[bytes], str]:
    """(image bytes, extension) or (None, error). Runs in worker processes."""
    image, image_size, resize, fmt = job
    try:
        if isinstance(image, np.ndarray):
            pil, raw, ext = PILImage.fromarray(image), None, None
        else:
            with open(image, "rb") as f:
                raw = f.read()
            pil = PILImage.open(io.BytesIO(raw))
            pil.load()  # decode fully: truncated or corrupt files fail here
            ext = {"JPEG": "jpg", "PNG": "png"}.get(pil.format)
        if image_size is None and raw is not None and fmt in ("auto", ext):
            return raw, ext  # already a decodable jpg/png: keep the original bytes
        pil = pil.convert("RGB") if pil.mode not in ("RGB", "L") else pil
        if image_size is not None:
            pil = shard_resize(pil, image_size, resize)
        out_ext = fmt if fmt != "auto" else ("png" if isinstance(image, np.ndarray) else "jpg")
        buf = io.BytesIO()
        if out_ext == "jpg":
            pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
        else:
            pil.save(buf, format="PNG", optimize=False)
        return buf.getvalue(), out_ext
    except Exception as e:  # any decode failure skips (or fails, under --strict) this one image
        return None, f"{type(e).__name__}: {e}"


def select_splits(source: Source, subset: dict[str, int], val_split: int, seed: int) -> None:
    """Seeded subsets (``subset``) and a validation split carved out of ``train`` (``val_split``)."""
    for split, n in subset.items():
        if split not in source.splits:
            raise DatasetError(f"--subset {split}={n}: no split {split!r} (have {sorted(source.splits)})")
        items = source.splits[split]
        if n < len(items):
            keep = sorted(random.Random(f"{seed}:{split}").sample(range(len(items)), n))
            source.splits[split] = [items[i] for i in keep]
    if val_split:
        if "train" not in source.splits or "val" in source.splits:
            raise DatasetError(f"--val-split needs a 'train' split and no 'val' split (have {sorted(source.splits)})")
        train = source.splits["train"]
        if val_split >= len(train):
            raise DatasetError(f"--val-split {val_split}: train has only {len(train)} samples")
        val = set(random.Random(f"{seed}:val").sample(range(len(train)), val_split))
        source.splits["trainval"] = train
        source.splits["val"] = [x for i, x in enumerate(train) if i in val]
        source.splits["train"] = [x for i, x in enumerate(train) if i not in val]


def write_shards(source: Source, out: str, *, image_size: Optional[int] = None, resize: str = "square",
                 fmt: str = "auto", shard_size: int = 256, workers: int = 1, strict: bool = False,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Encode every split of ``source`` into shards under ``out``; returns the manifest."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if not os.path.isfile(os.path.join(out, "manifest.json")):  # never delete a folder we did not make
            raise FileExistsError(f"{out} holds no manifest.json: --overwrite only replaces a shard folder "
                                  "written by make_shards")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    manifest = {
        "format": MANIFEST_FORMAT, "dataset": source.name, "num_classes": len(source.class_names),
        "class_names": source.class_names, "label_map": {str(k): v for k, v in source.label_map.items()},
        "preprocessing": {"image_size": image_size, "resize": resize if image_size else None,
                          "interpolation": "bicubic" if image_size else None, "encoding": fmt,
                          "jpeg_quality": JPEG_QUALITY},
        "splits": {}, "skipped": [],
    }
    try:
        with Pool(workers) if workers > 1 else _InlinePool() as pool:
            for split, items in source.splits.items():
                manifest["splits"][split] = _write_split(pool, tmp, split, items, image_size, resize, fmt,
                                                         shard_size, strict, manifest["skipped"], progress)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return manifest


def _write_split(pool, root, split, items, image_size, resize, fmt, shard_size, strict, skipped, progress):
    os.makedirs(os.path.join(root, split))
    jobs = ((image, image_size, resize, fmt) for image, _ in items)
    # balanced shards: N items in ceil(N / shard_size) shards of nearly equal size (streams that split
    # shards over ranks and workers then get nearly equal shares)
    num_shards = max(1, math.ceil(len(items) / shard_size))
    shard_of = [k * num_shards // max(1, len(items)) for k in range(len(items))]
    shards, writer, current, count = [], None, -1, 0
    bar = tqdm(total=len(items), desc=split, unit="img", disable=not progress)
    for i, (data, ext_or_error) in enumerate(pool.imap(_encode, jobs, chunksize=16)):
        bar.update(1)
        image, label = items[i]
        if data is None:
            where = image if isinstance(image, str) else f"{split}[{i}]"
            if strict:
                raise DatasetError(f"{where}: unreadable image ({ext_or_error}); drop --strict to skip such images")
            skipped.append({"split": split, "source": where, "error": ext_or_error})
            continue
        if shard_of[i] != current:
            if writer is not None:
                writer.close()
            name = f"{split}/{split}-{len(shards):06d}.tar"
            writer = wds.TarWriter(os.path.join(root, name), mtime=0, user="rlrr", group="rlrr")
            shards.append({"path": name, "num_samples": 0})
            current = shard_of[i]
        writer.write({"__key__": f"{split}-{i:08d}", ext_or_error: data, "cls": str(label).encode()})
        shards[-1]["num_samples"] += 1
        count += 1
    bar.close()
    if writer is not None:
        writer.close()
    for s in shards:
        s["sha256"] = sha256_file(os.path.join(root, s["path"]))
    return {"num_samples": count, "shards": shards}


class _InlinePool:
    """Pool's imap in this process (workers=1): simpler tracebacks, no fork."""
    def imap(self, fn, it, chunksize=1):
        return map(fn, it)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
