#!/usr/bin/env python
"""Evaluate a finished run on a split of shards: top-1/top-5, per-class accuracy and the confusion
matrix, each sample counted exactly once at any world size.

    python tools/evaluate.py runs/vtab/kitti                                  # the run's own test split
    torchrun --nproc_per_node=8 tools/evaluate.py runs/vtab/kitti --shards shards/kitti --split val200
    python tools/evaluate.py runs/vtab/kitti --source adapter --backbone ViT-B_16.npz

Writes <out>/evaluation.json (metrics, per-class accuracy, the confusion matrix) and confusion.png
(default out: RUN_DIR/eval-<split>). On the run's own test split it reproduces results.json's final
test accuracy: it is the same code (rlrr.evaluate). Each rank reads its own shards (the training
loader's exactly-once split), and the count must equal the manifest's.
"""
import argparse
import os
import sys

import numpy as np

from rlrr.atomic import write_atomic, write_json_atomic
from rlrr.cli import add_run_arguments, tool_main
from rlrr.config import ConfigError, load_config
from rlrr.data.loader import SplitLoader
from rlrr.data.manifest import open_manifest
from rlrr.distributed import barrier, init_distributed
from rlrr.evaluate import PlainModel, evaluate
from rlrr.inference import Preprocess, load_model


def plot_confusion(confusion: list, class_names: list, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.array(confusion, dtype=float)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(min(4 + 0.35 * n, 24), min(3.5 + 0.35 * n, 24)))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ticks = range(n) if n <= 60 else range(0, n, max(1, n // 30))
    ax.set_xticks(list(ticks), [class_names[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(list(ticks), [class_names[i] for i in ticks], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of the true class")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


@tool_main("evaluate")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap)
    ap.add_argument("--shards", help="shard folder (default: the run's data.shards)")
    ap.add_argument("--split", help="default: the run's data.test_split")
    ap.add_argument("--batch-size", type=int, default=64, help="per rank")
    ap.add_argument("--out", help="output folder (default: RUN_DIR/eval-<split>)")
    args = ap.parse_args(argv)
    info = init_distributed()
    cfg = load_config(os.path.join(args.run, "config.yaml"))
    shards, split = args.shards or cfg.data.shards, args.split or cfg.data.test_split
    manifest = open_manifest(cfg.data, shards)
    model, card = load_model(args.run, args.source, args.backbone, device=str(info.device))
    if manifest.num_classes != card["num_classes"]:
        raise ConfigError(f"{manifest.path}: {manifest.num_classes} classes, the run has {card['num_classes']}")
    pre = Preprocess(card)
    loader = SplitLoader(manifest, split, train=False, batch_size=args.batch_size, recipe=pre.recipe,
                         rank=info.rank, world=info.world, workers=0)
    scores = evaluate(PlainModel(model), loader, info, card["num_classes"], pre.stats, confusion=True)
    if info.is_main:
        result = {"run": args.run, "shards": shards, "split": split, "source": args.source, "world_size": info.world,
                  "class_names": card["class_names"], **scores}
        out = args.out or os.path.join(args.run, f"eval-{split}")
        os.makedirs(out, exist_ok=True)
        write_json_atomic(os.path.join(out, "evaluation.json"), result)
        plot_confusion(result["confusion"], card["class_names"], os.path.join(out, "confusion.png"),
                       f"{os.path.basename(os.path.normpath(args.run))}: {split}, top-1 {result['acc1']:.2f}%")
        print(f"{split}: top-1 {result['acc1']:.2f}%  top-5 {result['acc5']:.2f}%  ({result['samples']} samples, "
              f"world {info.world}); {out}/evaluation.json, confusion.png")
    barrier(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
