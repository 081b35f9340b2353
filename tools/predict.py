#!/usr/bin/env python
"""Classify images with a finished run: top-k class names and probabilities, with the run's own eval
preprocessing (inference.json), batched, on CPU or GPU.

    python tools/predict.py runs/vtab/kitti photos/*.jpg more_photos/        # files, folders, globs
    python tools/predict.py runs/vtab/kitti --shards shards/kitti --split test --json preds.json
    python tools/predict.py --adapters runs/kitti runs/dtd runs/pets -- photo.jpg   # several tasks, one backbone

Prints a table; ``--json`` / ``--csv`` write one record per image (and task). An unreadable image is
reported and skipped, never fatal to the batch; the exit status is 1 only if no image could be read.
Default source: the run's merged.safetensors (a plain timm model); ``--source adapter`` rebuilds the
backbone (``--backbone FILE`` to point at a moved pre-trained file) and loads adapter.safetensors.
With ``--adapters``, one backbone is loaded once and each task's adapter is switched in by copying
its tensors (rlrr.inference.AdapterBank).
"""
import argparse
import csv
import glob
import io
import os
import sys
import time

import torch

from rlrr.atomic import write_json_atomic, write_text_atomic
from rlrr.cli import add_run_arguments, tool_main
from rlrr.inference import AdapterBank, Preprocess, load_model

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def expand(inputs: list[str]) -> list[str]:
    """Files as given, folders walked (sorted), globs expanded; a missing path is kept so that it is
    reported as unreadable like any other bad input."""
    out = []
    for item in inputs:
        if os.path.isdir(item):
            out += sorted(os.path.join(d, f) for d, _, files in os.walk(item) for f in files
                          if f.endswith(IMAGE_EXTENSIONS))
        elif any(c in item for c in "*?[") and not os.path.exists(item):
            out += sorted(glob.glob(item, recursive=True))
        else:
            out.append(item)
    return out


def read_images(paths: list[str], pre: Preprocess):
    """[(name, uint8 image or None, error or None)] in input order."""
    out = []
    for path in paths:
        try:
            out.append((path, pre.load(path), None))
        except Exception as e:  # any decoder error: this image is skipped, the rest go on
            out.append((path, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    return out


def read_shards(shards: str, split: str):
    from rlrr.data.manifest import Manifest
    from rlrr.data.samples import read_split
    manifest = Manifest(shards)
    return [(key, image, None) for image, _, key in read_split(manifest.split(split).shards, manifest.reader())]


@torch.no_grad()
def predict(model, pre: Preprocess, items, class_names, top_k: int, batch_size: int, device) -> list[dict]:
    readable = [(name, image) for name, image, err in items if err is None]
    records = {}
    for i in range(0, len(readable), batch_size):
        chunk = readable[i:i + batch_size]
        probs = model(pre.batch([im for _, im in chunk]).to(device)).float().softmax(-1).cpu()
        p, idx = probs.topk(min(top_k, probs.shape[1]), dim=1)
        for (name, _), pr, ix in zip(chunk, p.tolist(), idx.tolist()):
            records[name] = [{"class": class_names[j], "index": j, "prob": q} for j, q in zip(ix, pr)]
    return [{"image": name, "top": records[name]} if err is None else {"image": name, "error": err}
            for name, _, err in items]


def table(rows: list[dict], multi: bool) -> str:
    lines = []
    for r in rows:
        task = f"{r['task']}  " if multi else ""
        if "error" in r:
            lines.append(f"{r['image']}  {task}UNREADABLE: {r['error']}")
        else:
            lines.append(f"{r['image']}  {task}" + "  ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict], top_k: int) -> None:
    buf = io.StringIO()
    fields = ["image", "task", "error"] + [f"{k}{i}" for i in range(1, top_k + 1) for k in ("class", "prob")]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        rec = {"image": r["image"], "task": r.get("task", ""), "error": r.get("error", "")}
        for i, t in enumerate(r.get("top", []), 1):
            rec[f"class{i}"], rec[f"prob{i}"] = t["class"], f"{t['prob']:.6f}"
        w.writerow(rec)
    write_text_atomic(path, buf.getvalue())


@tool_main("predict")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap, optional=True)  # omitted with --adapters
    ap.add_argument("images", nargs="*", help="image files, folders or globs (JPEG/PNG)")
    ap.add_argument("--adapters", nargs="+", metavar="RUN_DIR", help="several runs on one backbone")
    ap.add_argument("--shards", help="predict a split of a shard folder instead of files")
    ap.add_argument("--split", default="test")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write one record per image (and task) here")
    ap.add_argument("--csv", help="the same as CSV")
    args = ap.parse_args(argv)
    if args.adapters and args.run:
        args.images.insert(0, args.run)  # with --adapters every positional argument is an image
        args.run = None
    if not args.adapters and not args.run:
        ap.error("give a run directory, or --adapters RUN_DIR ...")
    if not args.images and not args.shards:
        ap.error("give images (files, folders, globs) or --shards")
    if args.top_k < 1 or args.batch_size < 1:
        ap.error("--top-k and --batch-size must be >= 1")
    device = torch.device(args.device)
    if args.adapters:
        t0 = time.perf_counter()
        bank = AdapterBank.from_runs(args.adapters, backbone=args.backbone)
        bank.model.to(device)
        for task in bank.tasks.values():  # heads and adapter tensors follow the model
            task["head"].to(device)
            task["tensors"] = {n: t.to(device) for n, t in task["tensors"].items()}
        print(f"predict: one backbone, {len(bank.tasks)} tasks, loaded in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        tasks = [(name, bank, t["card"]) for name, t in bank.tasks.items()]
    else:
        model, card = load_model(args.run, args.source, args.backbone, device=str(device))
        tasks = [(None, model, card)]
    items = read_shards(args.shards, args.split) if args.shards else read_images(expand(args.images),
                                                                                Preprocess(tasks[0][2]))
    rows = []
    for name, model, card in tasks:
        if name is not None:
            model = model.use(name)
            if card["preprocessing"] != tasks[0][2]["preprocessing"] and not args.shards:
                items = read_images([i[0] for i in items], Preprocess(card))
        for r in predict(model, Preprocess(card), items, card["class_names"], args.top_k, args.batch_size, device):
            rows.append({"task": name, **r} if name is not None else r)
    for r in rows:
        if "error" in r:
            print(f"predict: skipped {r['image']}: {r['error']}", file=sys.stderr)
    print(table(rows, multi=args.adapters is not None))
    if args.json:
        write_json_atomic(args.json, rows)
    if args.csv:
        write_csv(args.csv, rows, args.top_k)
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
