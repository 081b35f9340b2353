#!/usr/bin/env python
"""Convert a checkpoint of the official RLRR code into an rlrr adapter file.

    python tools/convert_official.py OFFICIAL.pth --model vit_base_patch16_224 --out adapter.safetensors

The adapter then loads with ``rlrr.load_adapter`` onto ``rlrr.create_model(NAME, num_classes,
pretrained=<the same .npz>)`` and gives the official model's logits.
"""
import argparse
import sys

import torch

from rlrr import RLRRConfig, create_model
from rlrr.adapter import check_adapter_fit, trainable_parameters, write_adapter
from rlrr.cli import tool_main
from rlrr.official import convert_official_vit


@tool_main("convert_official", errors=(OSError, ValueError, RuntimeError, TypeError))
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="state_dict saved by the official RLRR training script (.pth)")
    ap.add_argument("--model", required=True, help="timm ViT name, e.g. vit_base_patch16_224")
    ap.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    args = ap.parse_args(argv)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    tensors = convert_official_vit(state)
    num_classes = tensors["head.weight"].shape[0] if "head.weight" in tensors else 0
    config = RLRRConfig(split_qkv=True)
    with torch.device("meta"):  # shapes only, no memory
        model = create_model(args.model, num_classes=num_classes, config=config)
    check_adapter_fit(tensors, dict(trainable_parameters(model)), args.checkpoint, args.model)
    write_adapter(tensors, args.out, args.model, num_classes, config)
    print(f"wrote {args.out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} parameters, "
          f"{num_classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
