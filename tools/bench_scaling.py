#!/usr/bin/env python
"""How cost grows with the model and the number of processes: per-rank peak memory and img/s of RLRR
training through rlrr's own engines (DDP, DeepSpeed ZeRO-2, ZeRO-3), 1 and 2 processes each.

    python tools/bench_scaling.py --models vit_base_patch16_224,vit_large_patch16_224,vit_huge_patch14_224 \\
        --engines ddp,zero2,zero3 --nprocs 1,2 --batch-per-rank 1 --out-dir bench/scaling

Each cell is a fresh ``torchrun --standalone --nproc_per_node=N`` of this file: the model from
rlrr.model.build_model (random weights, the RLRR method), the engine from rlrr.engine, random images,
``--warmup`` then ``--steps`` optimizer steps. Per rank:
- ``setup_peak_mb``: peak memory while building the model and the engine (every rank builds the
  whole model before ZeRO-3 partitions it);
- ``train_peak_mb``: peak memory during the training steps (CPU: the process's peak RSS, reset
  through /proc/self/clear_refs after setup, with glibc told to return freed blocks at once (see
  WORKER_ENV); CUDA: max_memory_allocated after a reset), both over the memory the process held
  after its imports;
- ``params_held``: parameter elements on the rank, frozen ones included.
img/s is the global rate (world x batch per rank per step) over the timed steps. A cell that fails
is reported as failed with its error line, never as a number. Writes ``scaling.json``,
``scaling.md`` and each cell's log to ``--out-dir``.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from rlrr.distributed import status_mb
from rlrr.processes import run_limited
from rlrr.startup import long_lived_imports
from rlrr.world import exit_process

# glibc's malloc otherwise keeps freed blocks up to 32 MB (a transformer layer's weight) for re-use, so
# the resident set would count what ZeRO-3 gathered and released as held; with a fixed 64 KiB mmap
# threshold freed tensors go back to the system at once and the resident set follows the live tensors
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
ENGINE_CHOICES = {"ddp": ("ddp", 2), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size, to the current one


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mb("VmHWM")


def worker(args) -> int:
    with long_lived_imports():  # the collector paused while they load, then frozen
        import deepspeed  # noqa: F401  (every cell pays for the same imports, so the baselines agree)

        from rlrr.config import load_config
        from rlrr.distributed import gather_object, init_distributed
        from rlrr.engine import ENGINES
        from rlrr.model import build_model, store_frozen_weights_as_configured

    engine_name, stage = ENGINE_CHOICES[args.engine]
    info = init_distributed(always=True)
    base = 0.0 if info.device.type == "cuda" else status_mb("VmRSS")
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    cfg = load_config(None, ["data.shards=unused", f"model.name={args.model}", f"model.img_size={args.img_size}",
                             f"model.grad_checkpointing={args.grad_checkpointing}", f"train.engine={engine_name}",
                             f"train.zero_stage={stage}", f"train.precision={args.precision}",
                             f"train.batch_size={args.batch_per_rank * info.world}"]
                      + ([f"train.deepspeed_config={args.deepspeed_config}"] if args.deepspeed_config else []))
    torch.manual_seed(info.rank)
    model = build_model(cfg.model, args.num_classes, seed=0)  # the engine places it, as in training
    store_frozen_weights_as_configured(model, cfg.train)  # bf16 under DDP in bf16, as training stores them
    engine = ENGINES[engine_name](model, cfg, info)
    setup_peak = _peak_mb(info.device) - base
    _reset_peak(info.device)
    x = torch.randn(args.batch_per_rank, 3, args.img_size, args.img_size, device=info.device)
    y = torch.randint(0, args.num_classes, (args.batch_per_rank,), device=info.device)

    def step():
        engine.backward(x, y, last_micro=True)
        engine.step()

    for _ in range(args.warmup):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    rank = {"setup_peak_mb": round(setup_peak, 1), "train_peak_mb": round(_peak_mb(info.device) - base, 1),
            "params_held": engine.parameter_elements_held(), "seconds": elapsed}
    ranks = gather_object(info, rank)
    if info.is_main:
        result = {"per_rank": ranks, "img_s": round(args.steps * args.batch_per_rank * info.world
                                                    / max(r["seconds"] for r in ranks), 3),
                  "params_total": sum(p.numel() for p in model.parameters()) if stage != 3 else None,
                  "device": str(info.device)}
        with open(args.result, "w") as f:
            json.dump(result, f)
    return 0


def first_error(log: str) -> str:
    """The worker's own error line (torchrun's summary that follows it only says a child failed)."""
    with open(log) as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if ("Error" in line or "Exception" in line) and "ChildFailedError" not in line
              and "errors.html" not in line]
    return (errors or lines or ["no output"])[0]


def run_cell(args, model: str, engine: str, nproc: int) -> dict:
    result = os.path.join(args.out_dir, f"{model}-{engine}-{nproc}.json")
    if os.path.exists(result):
        os.remove(result)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "--worker", "--model", model, "--engine", engine, "--result", result,
           "--img-size", str(args.img_size), "--batch-per-rank", str(args.batch_per_rank), "--num-classes",
           str(args.num_classes), "--precision", args.precision, "--warmup", str(args.warmup), "--steps",
           str(args.steps)] + (["--grad-checkpointing"] if args.grad_checkpointing else []) \
        + (["--deepspeed-config", args.deepspeed_config] if args.deepspeed_config and engine != "ddp" else [])
    t0 = time.perf_counter()
    log = result[:-len(".json")] + ".log"
    with open(log, "w") as f:  # a cell cut at its limit is stopped with its ranks (rlrr.processes)
        rc = run_limited(cmd, args.timeout, stdout=f, stderr=subprocess.STDOUT, env=WORKER_ENV)
    if rc is None:
        error = f"timed out after {args.timeout} s"
    else:
        error = None if rc == 0 and os.path.exists(result) else first_error(log)
    cell = {"model": model, "engine": engine, "nproc": nproc, "wall_s": round(time.perf_counter() - t0, 1), "log": log}
    if error:
        return {**cell, "failed": error.strip()[:300]}
    with open(result) as f:
        return {**cell, **json.load(f)}


def table(cells: list[dict]) -> str:
    lines = ["| model | engine | processes | img/s | per-rank train peak (MB) | per-rank setup peak (MB) | "
             "params held per rank | vs DDP (train peak, same processes) |",
             "|---|---|---|---|---|---|---|---|"]
    ddp = {(c["model"], c["nproc"]): c for c in cells if c["engine"] == "ddp" and "failed" not in c}
    for c in cells:
        head = f"| {c['model']} | {c['engine']} | {c['nproc']} |"
        if "failed" in c:
            lines.append(f"{head} failed: {c['failed']} | | | | |")
            continue
        peak = max(r["train_peak_mb"] for r in c["per_rank"])
        ref = ddp.get((c["model"], c["nproc"]))
        ratio = f"{peak / max(r['train_peak_mb'] for r in ref['per_rank']):.2f}x" if ref else "n/a"
        lines.append(f"{head} {c['img_s']} | {peak:,.0f} | {max(r['setup_peak_mb'] for r in c['per_rank']):,.0f} | "
                     f"{max(r['params_held'] for r in c['per_rank']):,} | {ratio} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_base_patch16_224,vit_large_patch16_224,vit_huge_patch14_224")
    ap.add_argument("--engines", default="ddp,zero2,zero3", help=f"from {','.join(ENGINE_CHOICES)}")
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-per-rank", type=int, default=1)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--deepspeed-config", help="a DeepSpeed JSON for the ZeRO cells (train.deepspeed_config)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    ap.add_argument("--out-dir", default="bench/scaling")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINE_CHOICES]
    if unknown:
        print(f"bench_scaling: error: unknown engine(s) {unknown}; choose from {','.join(ENGINE_CHOICES)}",
              file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    cells = []
    for model in [m for m in args.models.split(",") if m]:
        for engine in engines:
            for nproc in [int(n) for n in args.nprocs.split(",") if n]:
                cells.append(run_cell(args, model, engine, nproc))
                print(json.dumps(cells[-1]), flush=True)
    from rlrr.atomic import write_json_atomic, write_text_atomic
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "model", "engine", "result")}
    write_json_atomic(os.path.join(args.out_dir, "scaling.json"),
                      {"config": config, "torch": torch.__version__, "cells": cells})
    md = table(cells)
    write_text_atomic(os.path.join(args.out_dir, "scaling.md"), md)
    print(md)
    return 1 if any("failed" in c for c in cells) else 0


if __name__ == "__main__":
    exit_process(main())  # a worker leaves without gloo's teardown
