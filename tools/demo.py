#!/usr/bin/env python
"""What rlrr does today, on CPU, with no downloads: build ViT and Swin backbones with RLRR, count the
trainable parameters, train a few steps, save the adapter, merge, and check the merged model."""
import os
import tempfile
import time

import timm
import torch

from rlrr import count_trainable, create_model, load_adapter, merge_rlrr, save_adapter

PAPER = {"vit_base_patch16_224": "0.33 M (VTAB, with head)", "vit_large_patch16_224": "0.82 M",
         "vit_huge_patch14_224": "1.33 M", "swin_base_patch4_window7_224": "0.41 M"}


def main() -> None:
    torch.manual_seed(0)
    print(f"{'backbone':32s} {'all params':>12s} {'RLRR+SSF (no head)':>19s} {'share':>7s}  paper")
    for name, paper in PAPER.items():
        with torch.device("meta"):  # shapes only: counting ViT-H needs no memory
            model = create_model(name, num_classes=0)
        total = sum(p.numel() for p in model.parameters())
        trainable = count_trainable(model)
        print(f"{name:32s} {total:12,d} {trainable:19,d} {100 * trainable / total:6.2f}%  {paper}")

    print("\nfine-tune a few steps, save the adapter, merge into a plain timm model (random backbone weights):")
    for name in ("vit_base_patch16_224", "swin_base_patch4_window7_224"):
        t0 = time.time()
        model = create_model(name, num_classes=10)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x, y = torch.randn(4, 3, 224, 224), torch.randint(0, 10, (4,))
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            adapted = model(x)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "adapter.safetensors")
            save_adapter(model, path)
            size = os.path.getsize(path)
            load_adapter(model, path)
        plain = timm.create_model(name, num_classes=10).eval()
        plain.load_state_dict(merge_rlrr(model).state_dict(), strict=True)
        with torch.no_grad():
            diff = (plain(x) - adapted).abs().max().item()
        status = "OK" if diff <= 1e-4 else "FAILED"
        print(f"  {name:30s} loss {loss.item():.3f}  adapter file {size / 1e6:.2f} MB  "
              f"merged vs adapted max|dlogit| {diff:.1e} [{status}]  ({time.time() - t0:.0f} s)")
        if status != "OK":
            raise SystemExit(1)


if __name__ == "__main__":
    main()
