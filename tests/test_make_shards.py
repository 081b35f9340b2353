"""tools/make_shards.py (rlrr/data/sources.py, shards.py) on tiny datasets in every layout and the real
Fashion-MNIST IDX files."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from rlrr.data.manifest import Manifest
from rlrr.data.samples import decode

from helpers import FASHION_MNIST, make_shards, make_vtab, run_tool_here, write_image

pytestmark = pytest.mark.integration  # the command-line tool, a process per call


def shards_here(*args):
    """make_shards.py in this process: for the error paths (the command line itself runs above)."""
    return run_tool_here("make_shards.py", *args, "--no-progress")


def read_shards(out: Path, split: str):
    manifest = Manifest(str(out))
    labels, keys = [], []
    for shard in manifest.split(split).shards:
        for sample in wds.tarfile_samples([{"url": shard}]):
            image, label, key = decode(sample)
            labels.append(label)
            keys.append(key)
    return manifest, labels, keys


def test_vtab_round_trip_counts_labels_and_manifest(tmp_path):
    src = make_vtab(tmp_path / "kitti")
    res = make_shards("vtab", "--root", src, "--out", tmp_path / "out", "--image-size", 32, "--shard-size", 5)
    assert res.returncode == 0, res.stderr
    manifest, labels, keys = read_shards(tmp_path / "out", "train800")
    assert labels == [i % 3 for i in range(12)]
    assert len(set(keys)) == 12
    data = manifest.data
    assert data["dataset"] == "kitti" and data["num_classes"] == 3 and data["class_names"] == ["0", "1", "2"]
    assert {s: v["num_samples"] for s, v in data["splits"].items()} == {
        "train800": 12, "val200": 4, "train800val200": 16, "test": 10}
    assert [s["num_samples"] for s in data["splits"]["train800"]["shards"]] == [4, 4, 4]  # balanced
    shard = data["splits"]["test"]["shards"][0]
    assert shard["path"] == "test/test-000000.tar"
    assert hashlib.sha256((tmp_path / "out" / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    assert data["preprocessing"]["image_size"] == 32 and data["skipped"] == []
    image, _, _ = decode(next(iter(wds.tarfile_samples([{"url": str(tmp_path / "out" / shard["path"])}]))))
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8


def test_same_input_gives_same_bytes(tmp_path):
    src = make_vtab(tmp_path / "t")
    for name, workers in (("a", 1), ("b", 2)):
        assert make_shards("vtab", "--root", src, "--out", tmp_path / name, "--image-size", 24,
                           "--workers", workers).returncode == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_fgvc_remaps_class_ids_over_the_union_of_splits(tmp_path):
    root = tmp_path / "CUB_200_2011"
    splits = {"train": {"a/1.jpg": 5, "b/2.jpg": 17}, "val": {"a/3.jpg": 5},
              "trainval": {"a/1.jpg": 5, "b/2.jpg": 17, "a/3.jpg": 5}, "test": {"c/4.jpg": 42, "b/5.jpg": 17}}
    for i, rel in enumerate(sorted({p for d in splits.values() for p in d})):
        write_image(root / "images" / rel, i)  # CUB keeps images under images/
    for s, d in splits.items():
        (root / f"{s}.json").write_text(json.dumps(d))
    res = make_shards("fgvc", "--root", root, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    manifest, labels, _ = read_shards(tmp_path / "out", "test")
    assert manifest.data["class_names"] == ["5", "17", "42"]
    assert manifest.data["label_map"] == {"5": 0, "17": 1, "42": 2}
    assert sorted(labels) == [1, 2]  # 17 -> 1 and 42 -> 2 in every split, not renumbered per split
    _, train_labels, _ = read_shards(tmp_path / "out", "train")
    assert sorted(train_labels) == [0, 1]
    # without trainval.json, trainval is train + val (what tools/protocol.py retrains on)
    (root / "trainval.json").unlink()
    assert make_shards("fgvc", "--root", root, "--out", tmp_path / "out2").returncode == 0
    manifest, trainval, _ = read_shards(tmp_path / "out2", "trainval")
    assert sorted(manifest.data["splits"]) == ["test", "train", "trainval", "val"] and sorted(trainval) == [0, 0, 1]


def test_imagefolder_and_corrupt_images(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(3):
                write_image(root / split / cls / f"{i}.png", c * 10 + i, fmt="PNG")
    (root / "train" / "dog" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    res = make_shards("imagefolder", "--root", root, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "1 skipped" in res.stdout
    manifest, labels, _ = read_shards(tmp_path / "out", "train")
    assert manifest.class_names == ["cat", "dog"] and sorted(labels) == [0, 0, 0, 1, 1, 1]
    assert manifest.data["splits"]["train"]["num_samples"] == 6
    (skip,) = manifest.data["skipped"]
    assert skip["split"] == "train" and skip["source"].endswith("dog/bad.jpg") and skip["error"]
    res = make_shards("imagefolder", "--root", root, "--out", tmp_path / "strict", "--strict")
    assert res.returncode == 2 and "bad.jpg: unreadable image" in res.stderr
    assert not (tmp_path / "strict").exists()  # nothing half-written


def test_bad_listings_are_clear_errors(tmp_path):
    src = make_vtab(tmp_path / "t")
    (src / "images" / "test" / "000003.jpg").unlink()
    res = shards_here("vtab", "--root", src, "--out", tmp_path / "o")
    assert res.returncode == 2
    assert "1 image file(s) not found" in res.stderr and "000003.jpg" in res.stderr and res.stderr.count("\n") == 1
    src = make_vtab(tmp_path / "u", classes=5)
    res = shards_here("vtab", "--root", src, "--out", tmp_path / "o", "--num-classes", 3)
    assert res.returncode == 2 and "label(s) outside [0, 3)" in res.stderr and "train800: 3" in res.stderr
    (src / "val200.txt").write_text("images/val200/000000.jpg cat\n")
    res = shards_here("vtab", "--root", src, "--out", tmp_path / "o")
    assert res.returncode == 2 and "val200.txt:1: expected 'relative/path label'" in res.stderr


def test_existing_output_is_refused_without_overwrite(tmp_path):
    src = make_vtab(tmp_path / "t")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = shards_here("vtab", "--root", src, "--out", out)
    assert res.returncode == 2 and "not empty; pass --overwrite" in res.stderr
    assert (out / "keep.txt").read_text() == "precious"
    res = shards_here("vtab", "--root", src, "--out", out, "--overwrite")  # not a folder make_shards wrote
    assert res.returncode == 2 and "holds no manifest.json: --overwrite only replaces a shard folder" in res.stderr
    assert (out / "keep.txt").read_text() == "precious"
    shards = tmp_path / "shards"
    assert shards_here("vtab", "--root", src, "--out", shards).returncode == 0
    (shards / "stale.txt").write_text("old")
    assert shards_here("vtab", "--root", src, "--out", shards, "--overwrite").returncode == 0
    assert not (shards / "stale.txt").exists() and (shards / "manifest.json").exists()


def test_real_fashion_mnist_idx(tmp_path):
    assert os.path.isdir(FASHION_MNIST), "make test installs Debian's dataset-fashion-mnist"
    res = make_shards("idx", "--root", FASHION_MNIST, "--out", tmp_path / "fm", "--subset", "train=500",
                      "--val-split", 100, "--subset", "test=300", "--name", "fashion-mnist")
    assert res.returncode == 0, res.stderr
    manifest, labels, _ = read_shards(tmp_path / "fm", "val")
    counts = {s: v["num_samples"] for s, v in manifest.data["splits"].items()}
    assert counts == {"train": 400, "val": 100, "trainval": 500, "test": 300}
    assert manifest.num_classes == 10 and set(labels) <= set(range(10)) and len(set(labels)) > 5
    from rlrr.data.sources import read_idx
    full = read_idx(FASHION_MNIST)  # every image of the real files (sharding them all would add 15 s)
    assert {k: len(v) for k, v in full.splits.items()} == {"train": 60000, "test": 10000}
    assert full.splits["train"][0][0].shape == (28, 28) and full.splits["train"][0][0].dtype == np.uint8
