"""tools/make_shards.py on tiny datasets in every layout, the real Fashion-MNIST IDX files, and the loaders."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlrr.data.loader import Manifest, SplitLoader, decode
from rlrr.data.transforms import Recipe, normalize

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def make_shards(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), *map(str, args), "--no-progress"],
                          capture_output=True, text=True)


def _image(path: Path, seed: int, size=(40, 30), fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


def make_vtab(root: Path, n_train=12, n_val=4, n_test=10, classes=3) -> Path:
    lines = {}
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        lines[split] = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            _image(root / rel, hash((split, i)) % 1000, size=(30 + i, 20 + i))
            lines[split].append(f"{rel} {i % classes}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (root / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return root


def read_shards(out: Path, split: str):
    manifest = Manifest(str(out))
    labels, keys = [], []
    for shard in manifest.split(split).shards:
        import webdataset as wds
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
    image, _, _ = decode(next(iter(__import__("webdataset").tarfile_samples([{"url": str(tmp_path / "out" / shard["path"])}]))))
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
        _image(root / "images" / rel, i)  # CUB keeps images under images/
    for s, d in splits.items():
        (root / f"{s}.json").write_text(json.dumps(d))
    res = make_shards("fgvc", "--root", root, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    manifest, labels, _ = read_shards(tmp_path / "out", "test")
    assert manifest.data["class_names"] == ["5", "17", "42"] and manifest.data["label_map"] == {"5": 0, "17": 1, "42": 2}
    assert sorted(labels) == [1, 2]  # 17 -> 1 and 42 -> 2 in every split, not renumbered per split
    _, train_labels, _ = read_shards(tmp_path / "out", "train")
    assert sorted(train_labels) == [0, 1]


def test_imagefolder_and_corrupt_images(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(3):
                _image(root / split / cls / f"{i}.png", c * 10 + i, fmt="PNG")
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
    res = make_shards("vtab", "--root", src, "--out", tmp_path / "o")
    assert res.returncode == 2
    assert "1 image file(s) not found" in res.stderr and "000003.jpg" in res.stderr and res.stderr.count("\n") == 1
    src = make_vtab(tmp_path / "u", classes=5)
    res = make_shards("vtab", "--root", src, "--out", tmp_path / "o", "--num-classes", 3)
    assert res.returncode == 2 and "label(s) outside [0, 3)" in res.stderr and "train800: 3" in res.stderr
    (src / "val200.txt").write_text("images/val200/000000.jpg cat\n")
    res = make_shards("vtab", "--root", src, "--out", tmp_path / "o")
    assert res.returncode == 2 and "val200.txt:1: expected 'relative/path label'" in res.stderr


def test_existing_output_is_refused_without_overwrite(tmp_path):
    src = make_vtab(tmp_path / "t")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = make_shards("vtab", "--root", src, "--out", out)
    assert res.returncode == 2 and "not empty; pass --overwrite" in res.stderr
    assert (out / "keep.txt").read_text() == "precious"
    assert make_shards("vtab", "--root", src, "--out", out, "--overwrite").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_real_fashion_mnist_idx(tmp_path):
    assert os.path.isdir(FASHION_MNIST), "make test installs Debian's dataset-fashion-mnist"
    res = make_shards("idx", "--root", FASHION_MNIST, "--out", tmp_path / "fm", "--subset", "train=500",
                      "--val-split", 100, "--subset", "test=300", "--name", "fashion-mnist")
    assert res.returncode == 0, res.stderr
    manifest, labels, _ = read_shards(tmp_path / "fm", "val")
    counts = {s: v["num_samples"] for s, v in manifest.data["splits"].items()}
    assert counts == {"train": 400, "val": 100, "trainval": 500, "test": 300}
    assert manifest.num_classes == 10 and set(labels) <= set(range(10)) and len(set(labels)) > 5
    full = make_shards("idx", "--root", FASHION_MNIST, "--out", tmp_path / "full", "--shard-size", 10000)
    assert full.returncode == 0, full.stderr
    data = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert data["splits"]["train"]["num_samples"] == 60000 and data["splits"]["test"]["num_samples"] == 10000


def tiny_vtab_shards(tmp: Path, n_train: int, n_val: int, n_test: int, shard_size: int) -> str:
    """A 4-class VTAB-layout task at 32 px, sharded; returns the shard folder."""
    src = make_vtab(tmp / "task", n_train=n_train, n_val=n_val, n_test=n_test, classes=4)
    res = make_shards("vtab", "--root", src, "--out", tmp / "shards", "--image-size", 32, "--shard-size", shard_size)
    assert res.returncode == 0, res.stderr
    return str(tmp / "shards")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_vtab_shards(tmp_path_factory.mktemp("loader"), n_train=22, n_val=4, n_test=23, shard_size=3)


@pytest.mark.parametrize("in_memory", [False, True])
def test_train_loader_is_deterministic_and_sized(shards, in_memory):
    manifest = Manifest(shards)
    loader = SplitLoader(manifest, "train800", train=True, batch_size=4, in_memory=in_memory, workers=2, seed=3,
                         recipe=Recipe("vtab", True, flip=True, image_size=32))
    epoch0 = [(x, k) for x, _, k in loader.epoch(0)]
    again = [(x, k) for x, _, k in loader.epoch(0)]
    epoch1 = [k for _, _, k in loader.epoch(1)]
    assert len(epoch0) == len(loader) and all(len(k) == 4 for _, k in epoch0)
    assert [k for _, k in epoch0] == [k for _, k in again]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(epoch0, again))  # flips included
    assert [k for _, k in epoch0] != epoch1
    assert epoch0[0][0].shape == (4, 3, 32, 32) and epoch0[0][0].dtype == torch.uint8


def test_recipes_and_normalize():
    images = torch.arange(2 * 3 * 256 * 256, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 256, 256)
    fgvc_eval = Recipe("fgvc", train=False)
    assert fgvc_eval.size == (256, 256) and torch.equal(fgvc_eval.augment(images), images[:, :, 16:240, 16:240])
    fgvc_train = Recipe("fgvc", train=True)
    out = fgvc_train.augment(images, torch.Generator().manual_seed(0))
    again = fgvc_train.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 224, 224) and torch.equal(out, again)
    vtab = Recipe("vtab", train=True, flip=True)
    big = vtab.resize(images[0])
    assert big.shape == (3, 224, 224) and big.dtype == torch.uint8
    same = torch.zeros(3, 224, 224, dtype=torch.uint8)
    assert vtab.resize(same) is same  # pre-resized shards are not resized again
    flipped = vtab.augment(images[:, :, :224, :224].repeat(50, 1, 1, 1), torch.Generator().manual_seed(1))
    n_flipped = sum(torch.equal(f, images[i % 2, :, :224, :224].flip(-1)) for i, f in enumerate(flipped))
    assert 20 < n_flipped < 80  # about half of 100
    assert not Recipe("vtab", train=True, flip=False).flip and not Recipe("vtab", train=False, flip=True).flip
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    torch.testing.assert_close(normalize(x), torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2))
    torch.testing.assert_close(normalize(x, "imagenet")[0, :, 0, 0], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    with pytest.raises(ValueError, match="stats must be one of"):
        normalize(x, "clip")


def test_two_ranks_two_workers_exactly_once_eval_and_equal_train_batches(shards, tmp_path):
    out = tmp_path / "result.json"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "tests" / "dist_data_check.py"), shards, str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = json.loads(out.read_text())
    expected_test = {f"test-{i:08d}" for i in range(23)}
    for mode in ("stream", "memory"):
        keys = ranks[0][f"test_{mode}"] + ranks[1][f"test_{mode}"]
        assert len(keys) == 23 and set(keys) == expected_test, mode  # no padding, no duplicates, none lost
        for epoch in (0, 1):
            r0, r1 = (r[f"train_{mode}_epoch{epoch}"] for r in ranks)
            assert len(r0["batches"]) == len(r1["batches"]) == r0["len"] > 0, (mode, epoch)
            assert all(len(b) == 4 for b in r0["batches"] + r1["batches"])
    # in memory, one epoch covers every training image (22 images, 2 ranks x 3 batches x 4 = 24 slots)
    seen = {k for r in ranks for b in r["train_memory_epoch0"]["batches"] for k in b}
    assert seen == {f"train800-{i:08d}" for i in range(22)}
