#!/usr/bin/env python
"""Many tasks on one backbone: how long switching tasks takes with rlrr.inference.AdapterBank (copy
the adapter tensors in) against rebuilding the model for each task (timm model + backbone file +
adapter), and inference img/s of the adapted model against the merged one.

    python tools/bench_adapters.py --model vit_base_patch16_224 --tasks 4 --batch-size 8

The backbone file is a safetensors copy of a randomly initialised model (the time to read and load
it is what matters, not its values); each task's adapter and head are random too (100 classes).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from rlrr.adapter import load_adapter, save_adapter, trainable_parameters
from rlrr.config import ModelConfig, RunConfig
from rlrr.inference import AdapterBank
from rlrr.model import build_model, merge_model


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


@torch.no_grad()
def img_per_s(model, batch: torch.Tensor, steps: int) -> float:
    model(batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        model(batch)
    return steps * len(batch) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed inference batches per model")
    ap.add_argument("--repeat", type=int, default=3, help="timed rebuilds / switch rounds")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = os.path.join(tmp, "backbone.safetensors")
        plain = build_model(ModelConfig(name=args.model, method="linear"), args.classes, seed=0)
        save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, backbone)
        del plain
        cfg = RunConfig()
        cfg.model = ModelConfig(name=args.model, pretrained=backbone, method="rlrr")
        adapters = []
        for t in range(args.tasks):
            model = build_model(cfg.model, args.classes, seed=t)
            g = torch.Generator().manual_seed(t)
            with torch.no_grad():
                for _, p in trainable_parameters(model):
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
            adapters.append(os.path.join(tmp, f"task{t}.safetensors"))
            save_adapter(model, adapters[-1])

        def rebuild(path=adapters[0]):
            m = build_model(cfg.model, args.classes, seed=0)
            load_adapter(m, path)
            return m.eval()

        rebuild_s = timed(rebuild, args.repeat)
        t0 = time.perf_counter()
        bank = AdapterBank(build_model(cfg.model, args.classes, seed=0), cfg)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for t, path in enumerate(adapters):
            bank.add_adapter(f"task{t}", path)
        add_s = (time.perf_counter() - t0) / len(adapters)
        names = list(bank.tasks)
        switches = []
        for r in range(args.repeat):
            for name in names[1:] + names[:1]:
                switches += timed(lambda name=name: bank.use(name), 1)
        batch = torch.randn(args.batch_size, 3, *bank.model.patch_embed.img_size) \
            if hasattr(bank.model, "patch_embed") else torch.randn(args.batch_size, 3, 224, 224)
        adapted_ips = img_per_s(bank.use(names[0]), batch, args.steps)
        merged = merge_model(rebuild(adapters[0]))
        merged_ips = img_per_s(merged.eval(), batch, args.steps)
    result = {"model": args.model, "tasks": args.tasks, "threads": torch.get_num_threads(),
              "rebuild_s_median": statistics.median(rebuild_s), "bank_first_load_s": load_s,
              "bank_add_adapter_s": add_s, "switch_ms_median": 1000 * statistics.median(switches),
              "switch_ms_max": 1000 * max(switches), "batch_size": args.batch_size,
              "adapted_img_s": adapted_ips, "merged_img_s": merged_ips}
    print(f"{args.model}: rebuild per task {result['rebuild_s_median']:.2f} s (timm model + backbone file + adapter) "
          f"vs AdapterBank switch {result['switch_ms_median']:.1f} ms (max {result['switch_ms_max']:.1f} ms); "
          f"bank: first load {load_s:.2f} s, {add_s * 1000:.0f} ms per adapter read")
    print(f"inference, batch {args.batch_size}: adapted {adapted_ips:.2f} img/s, merged {merged_ips:.2f} img/s "
          f"(merged/adapted {merged_ips / adapted_ips:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
