"""The train/eval loaders (rlrr/data/: loader, streaming, in_memory, samples) and the recipes' transforms
(rlrr/data/transforms.py)."""
import json
import subprocess
import warnings

import pytest
import torch

from rlrr.data.loader import SplitLoader
from rlrr.data.manifest import Manifest
from rlrr.data.transforms import Recipe, normalize
from rlrr.errors import ManifestError

from helpers import ROOT, launcher, tiny_vtab_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Uneven on purpose: 22 train images in shards of 3, 23 test images."""
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


def test_an_in_memory_split_placed_on_the_training_device_gives_the_same_batches(shards):
    """In a CUDA run the in-memory split lives on the GPU and is gathered, cropped and flipped there;
    the CPU stands in for that device here: the same batches, crops and flips, on that device."""
    recipe = Recipe("fgvc", True, flip=True, image_size=28)  # resize to 32, random crop 28, random flip
    batches = [list(SplitLoader(Manifest(shards), "train800", train=True, batch_size=4, in_memory=True, seed=3,
                                recipe=recipe, device=device).epoch(1)) for device in (None, torch.device("cpu"))]
    assert len(batches[0]) == len(batches[1]) == 6  # 22 images in batches of 4, the last one wrapped
    for (x0, y0, k0), (x1, y1, k1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and k0 == k1 and x1.shape == (4, 3, 28, 28)


def test_a_streamed_split_for_a_gpu_lands_in_pinned_memory(shards):
    """For a CUDA run the streaming loader pins its batches (copied to the GPU without waiting for it);
    the batches are the same (without a GPU, torch's loader skips the pinning with a warning)."""
    recipe = Recipe("vtab", True, image_size=32)
    loaders = [SplitLoader(Manifest(shards), "train800", train=True, batch_size=4, workers=0, recipe=recipe,
                           device=device) for device in (None, torch.device("cuda"))]
    plain = list(loaders[0].epoch(0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        pinned = list(loaders[1].epoch(0))
    assert all(x.is_pinned() == torch.cuda.is_available() for x, _, _ in pinned)
    assert [loader._stream.pin_memory for loader in loaders] == [False, True]
    for (x0, y0, k0), (x1, y1, k1) in zip(plain, pinned, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and k0 == k1


def test_manifest_errors_name_the_file_and_paths_cannot_leave_the_folder(shards, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    data = json.loads((bad / "manifest.json").read_text())
    data["splits"]["test"]["shards"][0]["path"] = "../../etc/passwd"
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"shard path '\.\./\.\./etc/passwd' leaves the manifest's folder"):
        Manifest(str(bad)).split("test")
    with pytest.raises(ManifestError, match="no split 'tset'; splits are"):
        Manifest(str(bad)).split("tset")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not a readable manifest"):
        Manifest(str(bad))


def test_recipes_and_normalize():
    images = torch.arange(2 * 3 * 256 * 256, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 256, 256)
    fgvc_eval = Recipe("fgvc", train=False)
    assert fgvc_eval.size == (256, 256) and torch.equal(fgvc_eval.augment(images), images[:, :, 16:240, 16:240])
    fgvc_train = Recipe("fgvc", train=True, flip=True)
    out = fgvc_train.augment(images, torch.Generator().manual_seed(0))
    again = fgvc_train.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 224, 224) and torch.equal(out, again) and fgvc_train.flip
    assert not Recipe("fgvc", train=True, flip=False).flip  # data.flip: false is honoured for FGVC too
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
    torch.testing.assert_close(normalize(x, "imagenet")[0, :, 0, 0],
                               torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


@pytest.mark.integration
def test_two_ranks_two_workers_exactly_once_eval_and_equal_train_batches(shards, tmp_path):
    out = tmp_path / "result.json"
    res = subprocess.run([*launcher(2), str(ROOT / "tests" / "dist_data_check.py"), shards, str(out)],
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


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"),
                                      ("P", "PNG")])
def test_the_fast_decoder_gives_pil_pixels_and_pil_is_the_fallback(mode, fmt, monkeypatch):
    import io

    import numpy as np
    from PIL import Image

    from rlrr.data import samples
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    sample = {fmt.lower().replace("jpeg", "jpg"): buf.getvalue(), "cls": "2", "__key__": "k"}
    assert samples.decode_image is not None  # torchvision's decoder is in use here
    fast, label, key = samples.decode(sample)
    monkeypatch.setattr(samples, "decode_image", None)
    slow, _, _ = samples.decode(sample)
    assert fast.shape == slow.shape == (3, 24, 40) and fast.dtype == slow.dtype == torch.uint8
    assert torch.equal(fast, slow) and label == 2 and key == "k"


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_eval_shard_is_a_one_line_data_error_here_or_from_a_loader_worker(shards, tmp_path, workers):
    """And close() then stops the loader's processes at once (the garbage collector would find that
    iterator in the traceback's reference cycle, its queues closed first, and wait 5 s per worker)."""
    import multiprocessing
    import shutil

    from rlrr.errors import DataError
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    shard = sorted((copy / "test").glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:700])
    loader = SplitLoader(Manifest(str(copy)), "test", train=False, batch_size=4, workers=workers,
                         recipe=Recipe("vtab", False, image_size=32))
    before = set(multiprocessing.active_children())  # other tests' loaders may still be alive
    with pytest.raises(DataError) as e:  # from a worker, torch rebuilds it from the worker's traceback text
        list(loader.epoch(0))
    assert str(e.value).startswith("unreadable shard: ") and str(shard) in str(e.value) and "\n" not in str(e.value)
    started = set(multiprocessing.active_children()) - before
    assert len(started) == workers
    loader.close()
    assert not any(p.is_alive() for p in started)


def _sample(key, fmt, mode, size, seed):
    import io

    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    # JPEGs keep full-resolution chroma (4:4:4): on per-pixel noise nvJPEG's chroma upsampling differs from
    # libjpeg-turbo's by about 14 levels (seen on an H200), where their IDCTs differ by a level or two
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **({"quality": 90, "subsampling": 0} if fmt == "JPEG" else {}))
    return {"jpg" if fmt == "JPEG" else "png": buf.getvalue(), "cls": str(seed % 4), "__key__": key,
            "__url__": f"shard-{seed // 4}.tar"}


# JPEG (RGB, grey) and PNG (RGBA, palette), at the recipe's size and not (resized where they are decoded)
SAMPLES = [("JPEG", "RGB", (32, 32)), ("PNG", "RGBA", (32, 32)), ("JPEG", "L", (40, 24)), ("PNG", "P", (20, 36)),
           ("JPEG", "RGB", (48, 48)), ("JPEG", "RGB", (32, 32))]


# the decoding device: the CPU, and the GPU where there is one (tools/gpu_acceptance.sh runs these there)
DECODE_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DECODE_DEVICES)
@pytest.mark.parametrize("train", [True, False])
def test_a_batch_decoded_on_the_device_is_the_batch_a_worker_makes(train, device):
    """data.decode: device. Workers pack the files and draw the augmentation; the training process decodes,
    resizes and augments. On the CPU the decoder is the workers' own: the same pixels. nvJPEG's IDCT and
    chroma upsampling differ from libjpeg-turbo's by a few levels, while two different crops or flips of
    these uniform-noise images differ by 255/3 = 85 on average: the same images, crops and flips."""
    from rlrr.data.samples import batches, decode, decode_packed, keep_encoded
    raw = [_sample(f"k{i}", *spec, seed=i) for i, spec in enumerate(SAMPLES)]
    recipe = Recipe("fgvc", train, flip=True, image_size=28)  # resize to 32, crop 28, flip
    made = list(batches(map(decode, raw), 4, recipe, torch.Generator().manual_seed(5)))
    packed = list(batches(map(keep_encoded, raw), 4, recipe, torch.Generator().manual_seed(5), packed=True))
    assert [len(k) for _, _, k in made] == [len(k) for _, _, k in packed] == [4, 2]
    for (x0, y0, k0), batch in zip(made, packed):
        x1, y1, k1 = decode_packed(batch, recipe, torch.device(device))
        assert x1.device.type == device and x1.shape == x0.shape and torch.equal(y0, y1) and k0 == k1
        if device == "cpu":
            assert torch.equal(x0, x1)
        else:
            per_image = (x1.cpu().float() - x0.float()).abs().mean(dim=(1, 2, 3))
            assert per_image.max() < 8, per_image


def test_an_image_the_device_cannot_decode_is_skipped_in_training_and_named_in_evaluation():
    import multiprocessing

    from rlrr.data.samples import batches, decode, decode_packed, keep_encoded
    from rlrr.errors import DataError
    raw = [_sample(f"k{i}", *spec, seed=i) for i, spec in enumerate(SAMPLES[:4])]
    raw[2]["jpg"] = b"not an image" + raw[2]["jpg"][:20]
    recipe = Recipe("vtab", True, flip=True, image_size=32)
    skipped = multiprocessing.get_context("fork").Value("i", 0)
    (batch,) = batches(map(keep_encoded, raw), 4, recipe, torch.Generator().manual_seed(0), packed=True)
    images, labels, keys = decode_packed(batch, recipe, torch.device("cpu"), skipped)
    good = [decode(s)[0] for s in raw[:2] + raw[3:]]
    kept = torch.tensor([True, True, False, True])
    assert skipped.value == 1 and keys == ["k0", "k1", "k3"] and labels.tolist() == [0, 1, 3]
    expected = recipe.apply(torch.stack([recipe.resize(x) for x in good]), batch[0].draw.keep(kept))
    assert torch.equal(images, expected)  # each kept image with its own draw
    with pytest.raises(DataError, match=r"^shard-0\.tar: sample k2: cannot decode \(RuntimeError: "):
        decode_packed(batch, Recipe("vtab", False, image_size=32), torch.device("cpu"))


def test_a_streamed_split_decoded_on_the_device_gives_the_workers_batches(shards):
    """Through the loader: the same training batches (seeded crops and flips) and evaluation batches, read
    in this process (workers=0). Packed batches through loader processes: tests/test_remote.py's 2-rank
    run trains the same adapter with data.decode: device as with the workers decoding."""
    recipe = Recipe("fgvc", True, flip=True, image_size=28)
    train = [list(SplitLoader(Manifest(shards), "train800", train=True, batch_size=4, workers=0, seed=3, recipe=recipe,
                              decode_device=device).epoch(1)) for device in (None, torch.device("cpu"))]
    test = [list(SplitLoader(Manifest(shards), "test", train=False, batch_size=4, workers=0,
                             recipe=Recipe("fgvc", False, image_size=28), decode_device=device).epoch(0))
            for device in (None, torch.device("cpu"))]
    for workers, device in (train, test):
        assert len(workers) == len(device) > 1
        for (x0, y0, k0), (x1, y1, k1) in zip(workers, device):
            assert torch.equal(x0, x1) and torch.equal(y0, y1) and k0 == k1


def test_an_in_memory_epoch_copies_its_index_order_to_the_device_once():
    """A plain copy from the host to a GPU waits for the GPU to finish what is queued; the in-memory loader
    copies the epoch's index order once (not once per batch) and each batch's images to flip, both
    pinned there (rlrr.data.transforms.host_to), and normalize its constants once. Counted on the meta
    device, where every copy from the host is an op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlrr.data.in_memory import MemoryEpoch

    copies = []

    class HostToDevice(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args) and out.device.type == "meta":
                copies.append(args[0].numel())
            return out

    recipe = Recipe("fgvc", train=True, flip=True, image_size=32)  # random crops of 37 px, and flips
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    epoch = MemoryEpoch(torch.empty(20, 3, *recipe.size, dtype=torch.uint8, device="meta"),
                        torch.empty(20, dtype=torch.long, device="meta"), [f"k{i}" for i in range(20)], order, 6,
                        recipe, torch.Generator().manual_seed(1))
    with HostToDevice():
        batches = list(epoch)
    assert [len(b[2]) for b in batches] == [6, 6, 6, 2] and [b[0].shape[-1] for b in batches] == [32] * 4
    assert [k for b in batches for k in b[2]] == [f"k{i}" for i in order.tolist()]
    flips = torch.Generator().manual_seed(1)  # the same draws: the flipped images of each batch
    expected = [int(recipe.draw(n, flips).flip.sum()) for n in (6, 6, 6, 2)]
    assert copies == [20, *expected]
    from rlrr.data import transforms  # normalize: its mean and std reach the device once, not per batch
    transforms._scale_shift.cache_clear()
    copies.clear()
    with HostToDevice():
        for images, _, _ in batches:
            assert normalize(images).dtype == torch.float32
    assert copies == [3, 3]
