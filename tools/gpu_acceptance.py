#!/usr/bin/env python
"""GPU acceptance: every GPU path once, with its figures, in one command (about 9 minutes on one
H200). Run through tools/gpu_acceptance.sh:

    bash tools/gpu_acceptance.sh --out-dir gpu-acceptance      # on a machine with one NVIDIA GPU
    bash tools/gpu_acceptance.sh --dry-run --out-dir /tmp/acc  # anywhere: the same steps, tiny, on CPU

Steps (each a fresh process; a step that breaks is named and the command exits 1 after the rest):
- bench-*: tools/benchmark.py, RLRR vs full fine-tuning, bf16 autocast, ViT-B/16 and ViT-H/14, with and
  without activation checkpointing: img/s, max_memory_allocated, counted FLOPs and MFU;
- bench-vit-h-frozen-bf16: RLRR with train.frozen_dtype=bf16;
- scaling: tools/bench_scaling.py, DDP (NCCL, world 1), DeepSpeed ZeRO-2 and ZeRO-3, bf16;
- train-*: launch/train.py under torchrun (NCCL), 20 optimizer steps on generated shards: DDP bf16,
  DDP fp16 with the gradient scaler, DeepSpeed ZeRO-2 bf16.
Writes acceptance.json and acceptance.md to --out-dir (the step logs too).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmarks(dry: bool) -> list[tuple[str, list[str]]]:
    """(name, tools/benchmark.py arguments) for each measured configuration."""
    size = ["--img-size", "32", "--device", "cpu", "--warmup", "1", "--steps", "1", "--windows", "1"] if dry else \
        ["--warmup", "3", "--steps", "10", "--windows", "2"]
    models = {"vit-b": ("test_vit" if dry else "vit_base_patch16_224", 4 if dry else 64),
              "vit-h": ("test_vit" if dry else "vit_huge_patch14_224", 4 if dry else 16)}
    out = []
    for key, (model, batch) in models.items():
        for ckpt in (False, True):
            args = ["--model", model, "--batch-size", str(batch), "--precision", "bf16", "--modes", "rlrr,full",
                    "--rounds", "1", *size] + (["--grad-checkpointing", "--no-inference"] if ckpt else [])
            out.append((f"bench-{key}{'-ckpt' if ckpt else ''}", args))
    model, batch = models["vit-h"]
    out.append(("bench-vit-h-frozen-bf16", ["--model", model, "--batch-size", str(batch), "--precision", "bf16",
                                            "--frozen-dtype", "bf16", "--modes", "rlrr", "--rounds", "1",
                                            "--no-inference", *size]))
    return out


def write_images(root: str, size: int, per_class: dict, classes: int = 4) -> None:
    """An imagefolder dataset of seeded noise images (the training run checks the GPU path, not accuracy)."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, f"class{c}", f"{i}.png"))


def training_runs(out_dir: str, dry: bool) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(the command that makes the shards, [(name, launch/train.py overrides)])."""
    size = 32 if dry else 224
    write_images(os.path.join(out_dir, "images"), 32 if dry else 64, {"train": 10 if dry else 40, "test": 4})
    shards = os.path.join(out_dir, "shards")
    make = [sys.executable, os.path.join(ROOT, "tools", "make_shards.py"), "imagefolder", "--root",
            os.path.join(out_dir, "images"), "--out", shards, "--image-size", str(size), "--overwrite", "--no-progress"]
    cfg = {"model": {"name": "test_vit" if dry else "vit_base_patch16_224", "img_size": size},
           "data": {"shards": shards, "train_split": "train", "test_split": "test", "workers": 2},
           "train": {"epochs": 4, "warmup_epochs": 1, "batch_size": 8 if dry else 32,
                     "log_every": 1, "save_every_epochs": 2},
           "output_dir": os.path.join(out_dir, "runs")}
    with open(os.path.join(out_dir, "train.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    runs = [("train-ddp-bf16", ["train.precision=bf16"]),
            ("train-ddp-fp16", ["train.precision=fp16"]),
            ("train-zero2-bf16", ["train.precision=bf16", "train.engine=deepspeed", "train.zero_stage=2"])]
    return make, runs


def run_step(name: str, cmd: list[str], out_dir: str, timeout: int, env=None) -> dict:
    t0 = time.perf_counter()
    log = os.path.join(out_dir, "logs", f"{name}.log")
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {timeout} s"
    step = {"step": name, "ok": rc == 0, "seconds": round(time.perf_counter() - t0, 1), "log": log}
    if rc != 0:
        with open(log) as f:
            tail = f.read().strip().splitlines()[-1:] or [""]
        step["error"] = f"exit {rc}: {tail[0][:300]}"
    print(f"{name}: {'ok' if rc == 0 else 'FAILED ' + step['error']} ({step['seconds']} s)", flush=True)
    return step


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        import deepspeed
        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = None
    return env


def report(result: dict) -> str:
    lines = [f"# GPU acceptance ({result['date']}, {result['environment']['device']})", "",
             f"torch {result['environment']['torch']}, CUDA {result['environment']['cuda']}, "
             f"DeepSpeed {result['environment']['deepspeed']}{' (dry run on CPU)' if result['dry_run'] else ''}", "",
             "| step | ok | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {'yes' if s['ok'] else 'FAILED: ' + s['error']} | {s['seconds']} |"
              for s in result["steps"]]
    lines += ["", "| benchmark | mode | img/s | max memory (MB) | GFLOP/img | MFU |", "|---|---|---|---|---|---|"]
    for name, data in result["benchmarks"].items():
        for mode, r in data["training"].items():
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            lines.append(f"| {name} | {mode} | {r['train_img_s']} | {r['peak_memory_mb']:,.0f} | "
                         f"{r['train_flops_per_image'] / 1e9:.2f} | {mfu} |")
    lines += ["", "| training run | steps | optimizer updates | img/s | test top-1 |", "|---|---|---|---|---|"]
    for name, r in result["training"].items():
        lines.append(f"| {name} | {r['steps']} | {r['optimizer_updates']} | {r['img_per_s']} | "
                     f"{r['test_acc1_final']} |")
    if result.get("scaling_md"):
        lines += ["", "## Engines (bf16, one process)", "", result["scaling_md"]]
    return "\n".join(lines) + "\n"


def run_all(jobs: list[tuple[str, list[str], int]], out_dir: str, at_once: int) -> list[dict]:
    """Run (name, command, timeout) steps, ``at_once`` at a time, in order of the list; steps side by
    side share the CPU cores instead of each taking all of them."""
    env = None
    if at_once > 1 and "OMP_NUM_THREADS" not in os.environ:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // at_once)))
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        return list(pool.map(lambda job: run_step(job[0], job[1], out_dir, job[2], env), jobs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="gpu-acceptance")
    ap.add_argument("--dry-run", action="store_true", help="the same steps with a tiny model on CPU")
    ap.add_argument("--jobs", type=int, default=1, help="steps at once (dry run only: figures need one at a time)")
    ap.add_argument("--timeout", type=int, default=200, help="seconds per step")
    ap.add_argument("--skip", action="append", default=[], metavar="STEP",
                    help="leave a step out (reported as skipped), e.g. to rerun only what failed")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_acceptance: error: no CUDA device; use --dry-run to check the steps on CPU", file=sys.stderr)
        return 2
    if args.jobs != 1 and not args.dry_run:
        print("gpu_acceptance: error: --jobs is for --dry-run; measured steps run one at a time", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out_dir)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    py = sys.executable
    bench_jobs = [(name, [py, "tools/benchmark.py", *bench_args, "--json", os.path.join(out, f"{name}.json")],
                   args.timeout) for name, bench_args in benchmarks(args.dry_run)]
    scaling = ["--models", "test_vit" if args.dry_run else "vit_base_patch16_224,vit_huge_patch14_224",
               "--engines", "ddp,zero2,zero3", "--nprocs", "1", "--precision", "bf16", "--out-dir",
               os.path.join(out, "scaling"), "--batch-per-rank", "2" if args.dry_run else "16"]
    scaling += ["--img-size", "32"] if args.dry_run else ["--warmup", "3", "--steps", "10"]
    # a dry run builds the same tiny model for ViT-B and ViT-H: the ViT-H commands would repeat the ViT-B ones
    skip = {name: "--skip" for name in args.skip}
    if args.dry_run:
        same = "dry run: the same tiny model as bench-vit-b"
        skip.update({name: same for name in ("bench-vit-h", "bench-vit-h-ckpt")})
    steps = run_all([j for j in bench_jobs + [("scaling", [py, "tools/bench_scaling.py", *scaling], 2 * args.timeout)]
                     if j[0] not in skip], out, args.jobs)
    benches = {}
    for step in steps:
        if step["ok"] and step["step"].startswith("bench-") and "skipped" not in step:
            with open(os.path.join(out, f"{step['step']}.json")) as f:
                benches[step["step"]] = json.load(f)
    make, runs = training_runs(out, args.dry_run)
    steps += run_all([("make-shards", make, args.timeout)], out, 1)
    if args.dry_run:
        skip["train-ddp-fp16"] = "fp16 needs CUDA (dry run)"
    train_jobs = [(name, [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "launch/train.py",
                          "--config", os.path.join(out, "train.yaml"), "--set", f"run_name={name}", *overrides],
                   args.timeout) for name, overrides in runs if name not in skip]
    training = {}
    for step in run_all(train_jobs, out, args.jobs):
        steps.append(step)
        if step["ok"]:
            with open(os.path.join(out, "runs", step["step"], "results.json")) as f:
                r = json.load(f)
            training[step["step"]] = {k: r[k] for k in ("steps", "optimizer_updates", "img_per_s", "test_acc1_final")}
            # fp16: the gradient scaler skips the steps whose scaled gradients overflow while it calibrates
            if r["steps"] != 20 or not 0 < r["optimizer_updates"] <= 20:
                step.update(ok=False, error=f"{r['steps']} steps, {r['optimizer_updates']} updates; expected 20")
    steps += [{"step": name, "ok": True, "seconds": 0.0, "skipped": why} for name, why in skip.items()]
    scaling_md = os.path.join(out, "scaling", "scaling.md")
    result = {"date": time.strftime("%Y-%m-%d"), "dry_run": args.dry_run, "environment": environment(),
              "steps": steps, "benchmarks": benches, "training": training,
              "scaling_md": open(scaling_md).read() if os.path.exists(scaling_md) else None}
    from rlrr.atomic import write_json_atomic, write_text_atomic
    write_json_atomic(os.path.join(out, "acceptance.json"), result)
    write_text_atomic(os.path.join(out, "acceptance.md"), report(result))
    failed = [s["step"] for s in steps if not s["ok"]]
    if failed:
        print(f"gpu_acceptance: FAILED: {', '.join(failed)} (logs in {out}/logs)", file=sys.stderr)
        return 1
    print(f"gpu_acceptance: all {len(steps)} steps passed; {out}/acceptance.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
