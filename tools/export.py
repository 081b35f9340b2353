#!/usr/bin/env python
"""Export a finished run's merged model (a plain timm model) to ONNX, with a dynamic batch axis, and
check it against PyTorch with onnxruntime on real images.

    python tools/export.py runs/vtab/kitti --onnx kitti.onnx
    python tools/export.py runs/vtab/kitti --onnx kitti.onnx --images 64 --atol 1e-4 --opset 18

The check runs the run's own test images (``--images`` of them, from its shards, with its eval
preprocessing) through both, in two batch sizes, and reports the largest absolute logit difference
and the top-1 agreement. A difference above ``--atol`` or any top-1 disagreement exits 1. The
report (opset, versions, figures) is written next to the file as OUT.onnx.json. The ONNX graph
takes normalised float32 NCHW images (inference.json says how: resize, crop, mean/std).
"""
import argparse
import os
import platform
import sys
import warnings

import numpy as np
import torch

from rlrr.atomic import write_atomic, write_json_atomic
from rlrr.cli import add_run_arguments, tool_main
from rlrr.config import load_config
from rlrr.data.manifest import open_manifest
from rlrr.data.samples import read_split
from rlrr.errors import DataError
from rlrr.inference import Preprocess, load_model


def test_images(run: str, card: dict, count: int) -> torch.Tensor:
    """The first ``count`` images of the run's test split, preprocessed as in evaluation."""
    cfg = load_config(os.path.join(run, "config.yaml"))
    manifest = open_manifest(cfg.data)
    images = []
    for image, _, _ in read_split(manifest.split(cfg.data.test_split).shards, manifest.reader()):
        images.append(image)
        if len(images) == count:
            break
    if not images:
        raise DataError(f"{manifest.path}: the test split {cfg.data.test_split} is empty")
    return Preprocess(card).batch(images)


def export(model: torch.nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    """torch's TorchScript-based exporter: the torch.export-based one needs onnxscript, which rlrr does not
    install. Its tracer warnings (image-size checks traced as constants) hold for the fixed input size,
    and the onnxruntime check below is what vouches for the file."""
    def write(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _export(tmp)

    def _export(tmp):
        torch.onnx.export(model, (example,), tmp, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    write_atomic(path, write)


def check(path: str, model: torch.nn.Module, images: torch.Tensor) -> dict:
    """Largest |ONNX - PyTorch| logit difference (batches of 1 and of all images: the batch axis is
    dynamic) and the top-1 agreement over all images."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    diffs = []
    for chunk in (images[:1], images):
        with torch.no_grad():
            expected = model(chunk).float().numpy()
        got = session.run(None, {"images": chunk.numpy()})[0]
        diffs.append(float(np.abs(got - expected).max()))
    agree = int((got.argmax(1) == expected.argmax(1)).sum())
    return {"max_abs_diff": max(diffs), "top1_agreement": agree / len(images), "images": len(images),
            "batch_sizes": [1, len(images)]}


@tool_main("export")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap, source=False)
    ap.add_argument("--onnx", required=True, help="output .onnx file")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--images", type=int, default=32, help="test images to check on")
    ap.add_argument("--atol", type=float, default=1e-4, help="largest allowed |ONNX - PyTorch| logit difference")
    args = ap.parse_args(argv)
    model, card = load_model(args.run, "merged")
    images = test_images(args.run, card, args.images)
    export(model, images[:2], args.onnx, args.opset)
    figures = check(args.onnx, model, images)
    import onnx
    import onnxruntime
    import timm
    size = card["img_size"]
    report = {"run": args.run, "onnx": args.onnx, "opset": args.opset,
              "input": f"images: float32 [batch, 3, {size}, {size}], normalised",
              "output": f"logits: [batch, {card['num_classes']}]",
              "versions": {"torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
                           "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
              "atol": args.atol, **figures}
    ok = figures["max_abs_diff"] <= args.atol and figures["top1_agreement"] == 1.0
    report["ok"] = ok
    write_json_atomic(args.onnx + ".json", report)
    print(f"export: {args.onnx} (opset {args.opset}): max |onnx - torch| {figures['max_abs_diff']:.3g}, top-1 "
          f"agreement {100 * figures['top1_agreement']:.1f}% on {figures['images']} test images")
    if not ok:
        print(f"export: error: onnxruntime disagrees with PyTorch (max abs diff {figures['max_abs_diff']:.3g} > "
              f"--atol {args.atol:g}, or a top-1 mismatch); {args.onnx}.json has the figures", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
