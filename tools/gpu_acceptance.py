#!/usr/bin/env python
"""GPU acceptance: every GPU path once, with its figures, in one command. Run through
tools/gpu_acceptance.sh:

    bash tools/gpu_acceptance.sh --out-dir gpu-acceptance      # on a machine with one NVIDIA GPU
    bash tools/gpu_acceptance.sh --dry-run --out-dir /tmp/acc  # anywhere: the same steps, tiny, on CPU

Steps (each a fresh process; a step that breaks is named and the command exits 1 after the rest):
- bench-*: tools/benchmark.py, bf16 autocast: RLRR's default path beside timm full fine-tuning's best
  (compiled, CUDA graphs) and RLRR's eager step for ViT-B/16 at 8 and 64, ViT-L/16 at 32 and ViT-H/14 at 16
  (and RLRR alone at 64); the other paths (full eager, the linear probe, LoRA, RLRR's Triton kernels,
  compiled by blocks and whole) at ViT-B/16 64 with inference; activation checkpointing; frozen weights kept
  in fp32 (ViT-H/14 16; bf16 is the default in bf16): img/s, warm-up seconds (compile), max_memory_allocated,
  counted FLOPs, MFU, graph breaks;
- fused-kernels: tests/test_fused.py on the GPU (rlrr/layers/fused.py's Triton kernels against the formula);
- device-decode: tests/test_loader.py's data.decode: device tests on the GPU (nvJPEG against the workers' decoder);
- graphs-accumulate: tests/test_engine.py's gradient accumulation under CUDA graphs on the GPU (no replay overwrites
  the window's first gradients);
- compiled-gradients: tools/check_gradients.py at ViT-B/16's batch 64: RLRR's compiled (whole with CUDA graphs, by
  blocks) and fused training steps against an eager float64 step, every trainable tensor, three steps;
- scaling: tools/bench_scaling.py, DDP (NCCL, world 1), DeepSpeed ZeRO-2 and ZeRO-3, bf16;
- loaders: tools/bench_data.py --device cuda: the loaders' img/s, streamed shards decoded by the workers
  and by nvJPEG (data.decode: device), in memory on the GPU;
- train-*: launch/train.py under torchrun (NCCL) with the defaults (one process: the whole model compiled and
  replayed as CUDA graphs; DeepSpeed: compiled by blocks),
  20 optimizer steps on generated shards: DDP bf16, DDP fp16 with the gradient scaler, DeepSpeed ZeRO-2; and
  train-resume, DDP bf16 stopped with a checkpoint after step 10 and resumed in a new process, whose adapter
  must equal train-ddp-bf16's bit for bit;
- train-loop*: launch/train.py on ViT-B/16 at batch 64 from in-memory shards, streamed shards decoded by
  the loader workers, and streamed shards decoded on the GPU (data.decode: device), each run's img/s set
  beside bench-vit-b-64's step for the path a run takes by default ("loop_vs_benchmark"); at batch 8 in
  memory, compiled whole and by blocks (train-loop-b8, train-loop-b8-blocks), beside bench-vit-b-8's.
"targets" (and a table in acceptance.md) sets the figures beside the GPU-speed goals: RLRR's default path at
least as fast as full fine-tuning's best compiled step and twice RLRR's eager step, its peak memory against
full fine-tuning's, the best RLRR MFU on ViT-H/14, each training loop
against its step (TARGET_MODES).
Every step shares one compile cache (<out-dir>/compile_cache). Writes acceptance.json and acceptance.md
to --out-dir (the step logs too), rewritten after every step ("complete": false until the end), so a
command cut short still leaves what it measured. The steps run most telling first (ORDER); ``--budget
SECONDS`` starts none after that time and cuts the one running, reporting the rest as not run (exit 1):

    bash tools/gpu_acceptance.sh --out-dir gpu-acceptance --budget 540   # done within 10 minutes

On an H200 (2026-12-04) a benchmark mode took 10-72 s (its own process, up to 61 s of compiling), the
correctness steps 91-133 s together: the whole command runs about half an hour, and --budget 505 measured
ViT-B/16 at 8 and 64, the batch-8 training loops, ViT-H/14 at 16 and the correctness steps. ``--modes`` and
``--skip`` narrow a rerun to what is left.

"""
import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from rlrr.atomic import write_json_atomic, write_text_atomic
from rlrr.processes import run_limited
from rlrr.profiling import describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["timm", "triton", "deepspeed", "webdataset", "peft"]  # besides torch: what the steps' figures rest on


# Each benchmark mode is a fresh process: on an H200 (2026-12-04) 30-80 s apiece, 10-61 s of it compiling. So each
# configuration measures what its targets read (RLRR's default path, full fine-tuning's best, RLRR's eager step),
# ViT-B/16 at 8 and 64 also RLRR's graphs by blocks (at small batches their replays' host time is the question),
# and one late step the remaining paths side by side.
TARGETED = "rlrr+cudagraphs,full+compiled,rlrr+torch"
GPU_BENCHMARKS = [  # (name, model, batch, benchmark.py options)
    ("bench-vit-b-8", "vit_base_patch16_224", 8,  # profiled: where the host's time goes in each one-graph step
     ["--no-inference", "--profile", "3",
      "--modes", "rlrr+cudagraphs,full+cudagraphs,rlrr+cudagraphs-blocks,full+compiled,rlrr+torch"]),
    ("bench-vit-b-64", "vit_base_patch16_224", 64,
     ["--no-inference", "--modes", "rlrr+cudagraphs,full+compiled,full+cudagraphs,rlrr+cudagraphs-blocks,rlrr+torch"]),
    ("bench-vit-b-64-paths", "vit_base_patch16_224", 64,  # every other path beside them, and inference
     ["--modes", "full,linear,lora,rlrr+fused,rlrr+compiled-blocks,rlrr+compiled"]),
    ("bench-vit-b-64-ckpt", "vit_base_patch16_224", 64,  # the default one-process path keeps its graphs: whole
     ["--grad-checkpointing", "--no-inference", "--modes", "full+compiled,rlrr+cudagraphs,rlrr+fused"]),
    ("bench-vit-l-32", "vit_large_patch16_224", 32, ["--no-inference", "--modes", TARGETED]),
    ("bench-vit-h-16", "vit_huge_patch14_224", 16, ["--no-inference", "--modes", TARGETED]),
    ("bench-vit-h-16-ckpt", "vit_huge_patch14_224", 16,
     ["--grad-checkpointing", "--no-inference", "--modes", "full+compiled,rlrr+cudagraphs,rlrr+fused"]),
    ("bench-vit-h-64", "vit_huge_patch14_224", 64,
     ["--no-inference", "--modes", "rlrr+cudagraphs,rlrr+cudagraphs-blocks"]),
    ("bench-vit-h-frozen-fp32", "vit_huge_patch14_224", 16,  # what train.frozen_dtype auto (bf16 here) saves
     ["--frozen-dtype", "fp32", "--no-inference", "--modes", "rlrr+cudagraphs,rlrr+fused"]),
]
DRY_RUNS = {"bench-vit-b-8": [],  # every mode; the checkpointed step in RLRR's default path and full fine-tuning's
            "bench-vit-b-64-ckpt": ["--grad-checkpointing", "--no-inference", "--modes", "rlrr,full"],
            "bench-vit-h-frozen-fp32": ["--frozen-dtype", "fp32", "--no-inference", "--modes", "rlrr,rlrr+fused"]}
DRY_MODES = "rlrr,rlrr+torch,rlrr+fused,full,linear"  # the compiled paths cost minutes of C++ builds on CPU
DRY_MODEL, DRY_BATCH = "test_vit", 4  # every bench step of a dry run


def benchmarks(dry: bool, modes: dict = None) -> list[tuple[str, list[str]]]:
    """(name, tools/benchmark.py arguments) for each measured configuration; ``modes`` (--modes) replaces
    a step's modes. A dry run takes the tiny model on CPU (Triton's interpreter for the kernels), so the
    steps that differ only in the model or batch would repeat each other: only DRY_RUNS' steps run."""
    out = []
    for name, model, batch, options in GPU_BENCHMARKS:
        if dry:
            if name not in DRY_RUNS:
                continue
            options = DRY_RUNS[name]
            options = options if "--modes" in options else [*options, "--modes", DRY_MODES]
            model, batch = DRY_MODEL, DRY_BATCH
            size = ["--img-size", "32", "--device", "cpu", "--warmup", "1", "--steps", "1", "--windows", "1"]
        else:
            size = ["--warmup", "3", "--steps", "10", "--windows", "2"]
        if name in (modes or {}):
            options = [*options[:options.index("--modes")], "--modes", modes[name]]
        out.append((name, ["--model", model, "--batch-size", str(batch), "--precision", "bf16", "--rounds", "1",
                           *size, *options]))
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
    write_images(os.path.join(out_dir, "images"), 32 if dry else 64,
                 {"train": 10 if dry else 40, "big": 16 if dry else 256, "test": 4})
    shards = os.path.join(out_dir, "shards")
    make = [sys.executable, os.path.join(ROOT, "tools", "make_shards.py"), "imagefolder", "--root",
            os.path.join(out_dir, "images"), "--out", shards, "--image-size", str(size), "--overwrite", "--no-progress"]
    cfg = {"model": {"name": "test_vit" if dry else "vit_base_patch16_224", "img_size": size},
           "data": {"shards": shards, "train_split": "train", "test_split": "test", "workers": 2},
           "train": {"epochs": 4, "warmup_epochs": 1, "batch_size": 8 if dry else 32,
                     "log_every": 1, "save_every_epochs": 2},
           "output_dir": os.path.join(out_dir, "runs")}
    cfg["train"]["compile_cache"] = os.path.join(out_dir, "compile_cache")
    with open(os.path.join(out_dir, "train.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    runs = [("train-ddp-bf16", ["train.precision=bf16"]),
            ("train-resume", ["train.precision=bf16"]),  # stopped at step 10, resumed (resume_command)
            ("train-ddp-fp16", ["train.precision=fp16"]),
            ("train-zero2-bf16", ["train.precision=bf16", "train.engine=deepspeed", "train.zero_stage=2"]),
            # the loop at the step's speed, evaluated once at the end (its benchmark's model), from each loader
            # each also profiles 5 steps (booked apart from its img/s): where a step's host time goes
            *[(name, ["train.precision=bf16", f"train.batch_size={batch}", "data.train_split=big", "train.epochs=3",
                      "train.eval_every=3", "train.save_every_epochs=3", "train.log_every=4", "train.profile_steps=5",
                      *overrides])
              for name, (overrides, _, batch, _) in loop_runs(dry).items()]]
    return make, runs


def loop_runs(dry: bool) -> dict[str, tuple[list[str], str, int, str]]:
    """The train-loop runs: name -> (overrides, the bench step it is set beside, its batch, the mode of that
    step the run takes). At ViT-B/16 64, one per loader: in memory, streamed with the workers decoding,
    streamed with the training process decoding on its device (nvJPEG on a GPU); each takes a one-process
    run's default path (the whole model compiled with CUDA graphs on a GPU, eager on CPU). At 8, in memory,
    that path and by blocks (train.compile_scope: blocks), where the graphs' host time is the question (a
    dry run skips those two: DRY_SKIPPED_LOOPS)."""
    workers = f"data.workers={1 if dry else 8}"
    b64 = b8 = b8_blocks = ("bench-vit-b-8", DRY_BATCH, "rlrr")
    if not dry:
        b64 = ("bench-vit-b-64", 64, "rlrr+cudagraphs")
        b8, b8_blocks = ("bench-vit-b-8", 8, "rlrr+cudagraphs"), ("bench-vit-b-8", 8, "rlrr+cudagraphs-blocks")
    return {"train-loop": (["data.in_memory=true"], *b64),
            "train-loop-stream": (["data.in_memory=false", workers], *b64),
            "train-loop-stream-device-decode": (["data.in_memory=false", workers, "data.decode=device"], *b64),
            "train-loop-b8": (["data.in_memory=true"], *b8),
            "train-loop-b8-blocks": (["data.in_memory=true", "train.compile_scope=blocks"], *b8_blocks)}


DRY_SKIPPED_LOOPS = ("train-loop-b8", "train-loop-b8-blocks")  # eager on CPU, one tiny model: train-loop again


RESUME_AT = 10  # train-resume: the first process stops with a checkpoint after this step, the second resumes


def resume_command(cmd: list[str]) -> list[str]:
    """train-resume: ``cmd`` (a torchrun launch/train.py command) stopped after RESUME_AT steps with a
    checkpoint (train.max_steps, as a preemption stops), then the same run resumed in a new process."""
    cut = [*cmd, f"train.max_steps={RESUME_AT}"]
    at = cmd.index("--set")
    rest = [*cmd[:at], "--resume", "latest", *cmd[at:]]
    return ["bash", "-c", f"{shlex.join(cut)} && {shlex.join(rest)}"]


def resumed_vs_uninterrupted(out: str) -> Optional[dict]:
    """train-resume's adapter against train-ddp-bf16's (the same run, uninterrupted): the largest
    difference of any element, and whether they are equal bit for bit; None until both exist."""
    paths = [os.path.join(out, "runs", name, "adapter.safetensors") for name in ("train-resume", "train-ddp-bf16")]
    if not all(os.path.exists(p) for p in paths):
        return None
    resumed, whole = (load_file(p) for p in paths)
    if resumed.keys() != whole.keys():
        return {"max_abs_diff": math.inf, "bitwise": False}
    diff = max((resumed[k].float() - whole[k].float()).abs().max().item() for k in whole)
    return {"max_abs_diff": diff, "bitwise": all(torch.equal(resumed[k], whole[k]) for k in whole)}


def loop_vs_benchmark(training: dict, benches: dict, dry: bool) -> dict:
    """Each train-loop run's img/s over the step of the path it takes (loop_runs)."""
    out = {}
    for run, (_, name, _, mode) in loop_runs(dry).items():
        bench = benches.get(name, {}).get("training", {})
        if run in training and mode in bench:
            step = bench[mode]["train_img_s"]
            out[run] = {"loop_img_s": training[run]["img_per_s"], "bench_img_s": step, "bench_mode": mode,
                        "ratio": round(training[run]["img_per_s"] / step, 3)}
    return out


# The GPU-speed targets, read off the benchmarks: RLRR's default one-process path against full fine-tuning's best
# compiled step (speed, memory) and against RLRR's eager step with torch's ops (where it started); the best RLRR
# MFU on ViT-H/14 at any batch measured; each training loop against its benchmark step. A dry run compares
# the paths a CPU run takes.
TARGET_MODES = {False: ("rlrr+cudagraphs", ("full+compiled", "full+cudagraphs"), "rlrr+torch"),
                True: ("rlrr", ("full",), "rlrr+torch")}
SPEED_TARGET, EAGER_TARGET, MFU_TARGET, LOOP_TARGET = 1.0, 2.0, 0.40, 0.9
SPEED_BENCHES = ["bench-vit-b-8", "bench-vit-b-64", "bench-vit-l-32", "bench-vit-h-16"]
MEMORY_TARGETS = {"bench-vit-b-64": 0.85, "bench-vit-h-16": 0.6}  # at most this share of full fine-tuning's peak


def gradient_check(out: str) -> Optional[float]:
    """compiled-gradients: the largest error of any checked path over its bound (tools/check_gradients.py; inf
    where a path failed), None until it ran."""
    data = _read(os.path.join(out, "compiled-gradients.json"), json.load)
    if data is None:
        return None
    ratios = [p["worst_ratio"] for m in data["methods"].values() for p in m["paths"].values()]
    failed = any(m["failed"] for m in data["methods"].values())
    return math.inf if failed or not ratios else max(ratios)


def targets(benches: dict, loops: dict, dry: bool, resume: Optional[dict] = None,
            gradients: Optional[float] = None) -> list[dict]:
    """One row per target: what is compared, the measured value, the goal, and whether it is met (value
    and met None: not measured)."""
    default, fulls, eager = TARGET_MODES[dry]
    rows = []

    def add(target, value, at_least=None, at_most=None):
        goal = f">= {at_least}" if at_least is not None else f"<= {at_most}"
        ok = None if value is None else value >= at_least if at_least is not None else value <= at_most
        rows.append({"target": target, "value": value, "goal": goal, "ok": ok})

    def ratio(name, num, den, key):
        t = benches.get(name, {}).get("training", {})
        return round(t[num][key] / t[den][key], 3) if num in t and den in t else None

    def best_full(name):
        t = benches.get(name, {}).get("training", {})
        return max(((t[m]["train_img_s"], m) for m in fulls if m in t), default=(None, "full"))[1]

    for name in SPEED_BENCHES:
        full = best_full(name)  # named: a step cut short may not have measured every full fine-tuning path
        add(f"{name}: {default} / {full}, the fastest full fine-tuning measured (img/s)",
            ratio(name, default, full, "train_img_s"), at_least=SPEED_TARGET)
        add(f"{name}: {default} / {eager} (img/s)", ratio(name, default, eager, "train_img_s"), at_least=EAGER_TARGET)
    for name, limit in MEMORY_TARGETS.items():
        full = best_full(name)
        add(f"{name}: {default} / {full} (peak memory)", ratio(name, default, full, "peak_memory_mb"), at_most=limit)
    mfus = [(r["mfu"], f"{name} {mode}") for name, b in benches.items() if name.startswith("bench-vit-h-")
            for mode, r in b.get("training", {}).items() if mode.startswith("rlrr") and r.get("mfu") is not None]
    mfu, where = max(mfus, default=(None, "not measured"))
    add(f"ViT-H/14: best RLRR MFU ({where})", None if mfu is None else round(mfu, 3), at_least=MFU_TARGET)
    for run, loop in loops.items():
        add(f"{run}: the run's img/s / its benchmark step ({loop['bench_mode']})", loop["ratio"], at_least=LOOP_TARGET)
    # a graph break runs the code between a compiled graph's pieces eagerly (2026-12-04: one per RLRR layer
    # made the compiled step slower than eager)
    breaks = [r["graph_breaks"] for b in benches.values() for mode, r in b.get("training", {}).items()
              if mode.startswith("rlrr") and "graph_breaks" in r]
    add("graph breaks in RLRR's steps, all benchmarks", sum(breaks) if breaks else None, at_most=0)
    # a compiled graph not recorded as a CUDA graph launches each kernel from the host (why: the mode's log)
    skips = [r["cudagraph_skips"] for b in benches.values() for mode, r in b.get("training", {}).items()
             if mode.startswith("rlrr+cudagraphs") and "cudagraph_skips" in r]
    add("graphs not recorded as CUDA graphs in RLRR's cudagraphs steps", sum(skips) if skips else None, at_most=0)
    # a run stopped with a checkpoint and resumed ends with the uninterrupted run's adapter (compiled, CUDA graphs)
    add("train-resume: its adapter against train-ddp-bf16's, the same run uninterrupted (max abs difference)",
        None if resume is None else resume["max_abs_diff"], at_most=0.0)
    # the compiled and fused steps' gradients against eager float64's, over the bound eager bf16's own error sets
    add("compiled-gradients: RLRR's compiled and fused gradients, the largest error over its bound", gradients,
        at_most=1.0)
    return rows


def run_step(name: str, cmd: list[str], out_dir: str, timeout: float, env=None, deadline: float = math.inf,
             own_group: bool = True) -> dict:
    """Run one step; not started once ``deadline`` (time.monotonic()) has passed, and cut at it.
    ``own_group``: rlrr.processes.run_limited's."""
    left = deadline - time.monotonic()
    if left <= 0:
        print(f"{name}: not run (the time budget ran out)", flush=True)
        return {"step": name, "ok": False, "seconds": 0.0, "not_run": "the time budget ran out"}
    timeout = min(timeout, left)
    t0 = time.perf_counter()
    log = os.path.join(out_dir, "logs", f"{name}.log")
    with open(log, "w") as f:  # a step cut at its limit is stopped with every process it started
        rc = run_limited(cmd, timeout, own_group=own_group, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if rc is None:
        rc = f"timed out after {timeout:.0f} s"
    step = {"step": name, "ok": rc == 0, "seconds": round(time.perf_counter() - t0, 1), "log": log}
    if rc != 0:
        with open(log) as f:
            tail = f.read().strip().splitlines()[-1:] or [""]
        step["error"] = f"exit {rc}: {tail[0][:300]}"
    print(f"{name}: {'ok' if rc == 0 else 'FAILED ' + step['error']} ({step['seconds']} s)", flush=True)
    return step


def environment() -> dict:
    """The versions the figures depend on; a package the steps need that is missing shows as None (its steps
    then fail naming it)."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for name in PACKAGES:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    return env


def _outcome(step: dict) -> str:
    if "not_run" in step:
        return f"not run: {step['not_run']}"
    if "skipped" in step:
        return f"skipped: {step['skipped']}"
    return "yes" if step["ok"] else f"FAILED: {step['error']}"


def _compiled(plan: dict) -> str:
    return f"by {plan['scope']}" if plan["compile"] else "no"


def report(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU acceptance ({result['date']}, {result['environment']['device']})", "",
             ", ".join([f"torch {env['torch']}", f"CUDA {env['cuda']}"] +
                       [f"{name} {env.get(name) or 'NOT INSTALLED'}" for name in PACKAGES])
             + (" (dry run on CPU)" if result["dry_run"] else ""), "",
             *([] if result["complete"] else ["Incomplete: written after each step; the command was still running "
                                              "or was stopped.", ""]),
             "| step | ok | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {_outcome(s)} | {s['seconds']} |" for s in result["steps"]]
    lines += ["", "| benchmark | mode | img/s | warm-up (s) | max memory (MB) | GFLOP/img | MFU | graph breaks "
                  "| CUDA-graph skips | process (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, data in result["benchmarks"].items():
        for mode, r in data["training"].items():
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            lines.append(f"| {name} | {mode} | {r['train_img_s']} | {r['warmup_s'][0]} | {r['peak_memory_mb']:,.0f} "
                         f"| {r['train_flops_per_image'] / 1e9:.2f} | {mfu} | {r.get('graph_breaks', 'n/a')} "
                         f"| {r.get('cudagraph_skips', 'n/a')} | {sum(r.get('process_s', [])) or 'n/a'} |")
        lines += [f"| {name} | {mode} | failed: {error} |{' |' * 7}" for mode, error in data.get("failed", {}).items()]
    lines += ["", "| training run | steps | optimizer updates | img/s | warm-up (s) | compiled | CUDA graphs | "
              "test top-1 | profiled |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["training"].items():
        lines.append(f"| {name} | {r['steps']} | {r['optimizer_updates']} | {r['img_per_s']} | {r['warmup_s']} | "
                     f"{_compiled(r['compile'])} | {r['compile']['cuda_graphs']} | {r['test_acc1_final']} | "
                     f"{describe(r['profile']) if r.get('profile') else ''} |")
    for run, loop in result["loop_vs_benchmark"].items():
        lines += ["", f"{run}: {loop['loop_img_s']} img/s, {loop['ratio']}x the benchmark step "
                      f"({loop['bench_mode']}, {loop['bench_img_s']} img/s)"]
    if result.get("resume"):
        r = result["resume"]
        equal = "equal" if r["bitwise"] else "not equal"
        lines += ["", f"train-resume (stopped after step {RESUME_AT}, resumed in a new process) against "
                      f"train-ddp-bf16: max abs difference {r['max_abs_diff']:.3g}, {equal} bit for bit"]
    lines += ["", "## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {'not measured' if t['value'] is None else t['value']} | {t['goal']} | "
              f"{ {True: 'yes', False: 'NO', None: 'not measured'}[t['ok']]} |" for t in result["targets"]]
    if result.get("input_pipeline"):
        data = result["input_pipeline"]
        lines += ["", f"## Input pipeline ({data['images']} images, {data['workers']} workers, batch "
                      f"{data['batch_size']}, on {data['device']})", "", "| loader | img/s |", "|---|---|"]
        lines += [f"| {k.removesuffix('_img_s')} | {v:,} |" for k, v in data.items() if k.endswith("_img_s")]
    if result.get("scaling_md"):
        lines += ["", "## Engines (bf16, one process)", "", result["scaling_md"]]
    return "\n".join(lines) + "\n"


class Acceptance:
    """The outcome so far: every finished step, the benchmarks' and the training runs' figures. Rewritten
    to acceptance.{json,md} after each step, so a command cut short (a time limit, a lost machine)
    still leaves what it measured."""

    def __init__(self, out: str, dry: bool):
        self.out, self.dry = out, dry
        self.steps, self.benches, self.training = [], {}, {}
        self.lock = threading.Lock()
        self.environment = environment()

    def add(self, step: dict) -> None:
        with self.lock:
            self.steps.append(step)
            self._collect(step)
            self.write(complete=False)

    def _collect(self, step: dict) -> None:
        name = step["step"]
        if name.startswith("bench-"):  # also from a step cut short or with a failed mode: the modes it measured
            bench = _read(os.path.join(self.out, f"{name}.json"), json.load)
            if bench is not None:
                self.benches[name] = bench
        elif name.startswith("train-") and step["ok"]:
            with open(os.path.join(self.out, "runs", name, "results.json")) as f:
                r = json.load(f)
            self.training[name] = {k: r.get(k) for k in ("steps", "optimizer_updates", "img_per_s", "test_acc1_final",
                                                         "warmup_s", "compile", "profile")}
            # fp16: the gradient scaler skips the steps whose scaled gradients overflow while it calibrates
            if not name.startswith("train-loop") and (r["steps"] != 20 or not 0 < r["optimizer_updates"] <= 20):
                step.update(ok=False, error=f"{r['steps']} steps, {r['optimizer_updates']} updates; expected 20")

    def write(self, complete: bool) -> None:
        scaling_md = os.path.join(self.out, "scaling", "scaling.md")
        data_json = os.path.join(self.out, "loaders.json")
        loops = loop_vs_benchmark(self.training, self.benches, self.dry)
        resume = resumed_vs_uninterrupted(self.out)  # loads two adapters: once a write
        result = {"date": time.strftime("%Y-%m-%d"), "dry_run": self.dry, "complete": complete,
                  "environment": self.environment, "steps": self.steps, "benchmarks": self.benches,
                  "training": self.training, "loop_vs_benchmark": loops,
                  "resume": resume, "targets": targets(self.benches, loops, self.dry, resume, gradient_check(self.out)),
                  "scaling_md": _read(scaling_md), "input_pipeline": _read(data_json, json.load)}
        write_json_atomic(os.path.join(self.out, "acceptance.json"), result)
        write_text_atomic(os.path.join(self.out, "acceptance.md"), report(result))


def _read(path: str, parse=lambda f: f.read()):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return parse(f)


def run_all(jobs: list[tuple[str, list[str], int]], acceptance: Acceptance, at_once: int,
            deadline: float = math.inf) -> None:
    """Run (name, command, timeout) steps, ``at_once`` at a time, in order of the list, each recorded in
    ``acceptance`` when it ends. One at a time (every measured run), in this thread: Ctrl-C stops the
    running step with all it started. Side by side (a dry run's --jobs), the steps share the CPU cores
    instead of each taking all of them, and stay in this process's group, where a terminal's Ctrl-C
    reaches them."""
    if at_once == 1:
        for name, cmd, timeout in jobs:
            acceptance.add(run_step(name, cmd, acceptance.out, timeout, None, deadline))
        return
    env = None
    if "OMP_NUM_THREADS" not in os.environ:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // at_once)))

    def one(job):
        acceptance.add(run_step(job[0], job[1], acceptance.out, job[2], env, deadline, own_group=False))

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        list(pool.map(one, jobs))


# What a run cut short by --budget should have measured first: ViT-B/16 at 8 (where the graphs' host time is the
# question) and its training loop, ViT-B/16 at 64 and ViT-H/14 at 16 (the figures the acceptance is judged on),
# the kernels', the graphs' and the compiled gradients' correctness on the device, ViT-L/16 at 32 and ViT-H/14 at
# 64, the training loop beside its step (and at 8 by blocks), the engines under torchrun, then the rest (a step
# not listed runs last). make-shards comes before the training runs, which read its shards. On an H200
# (2026-12-04) a benchmark mode took 10-72 s and the three correctness steps then 91-133 s together.
ORDER = ["bench-vit-b-8", "make-shards", "train-loop-b8", "bench-vit-b-64", "bench-vit-h-16", "fused-kernels",
         "graphs-accumulate", "compiled-gradients", "device-decode", "bench-vit-l-32", "bench-vit-h-64",
         "train-loop", "train-loop-b8-blocks", "train-ddp-bf16", "train-resume", "train-ddp-fp16",
         "train-zero2-bf16", "train-loop-stream", "train-loop-stream-device-decode", "bench-vit-b-64-paths",
         "bench-vit-b-64-ckpt", "bench-vit-h-16-ckpt", "bench-vit-h-frozen-fp32", "scaling", "loaders"]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="gpu-acceptance")
    ap.add_argument("--dry-run", action="store_true", help="the same steps with a tiny model on CPU")
    ap.add_argument("--jobs", type=int, default=1, help="steps at once (dry run only: figures need one at a time)")
    ap.add_argument("--timeout", type=int, default=400,
                    help="seconds per step (a bench step compiles the whole model for each of its modes)")
    ap.add_argument("--budget", type=float, default=math.inf, metavar="SECONDS",
                    help="start no step after this many seconds, and cut the running ones there (they are "
                         "reported as not run; the most telling steps come first)")
    ap.add_argument("--modes", action="append", default=[], metavar="STEP=MODES",
                    help="measure these tools/benchmark.py modes in a bench step instead of its own, e.g. "
                         "bench-vit-b-8=rlrr+cudagraphs,full+cudagraphs")
    ap.add_argument("--skip", action="append", default=[], metavar="STEP",
                    help="leave a step out (reported as skipped), e.g. to rerun only what failed")
    return ap.parse_args(argv)


def step_commands(args, out: str) -> dict[str, tuple[list[str], int]]:
    """Every step but make-shards and the training runs: name -> (command, timeout)."""
    py = sys.executable
    commands = {name: ([py, "tools/benchmark.py", *bench_args, "--json", os.path.join(out, f"{name}.json"),
                        "--log-dir", os.path.join(out, "logs", name)],  # each mode's stderr, a failed one's trace
                       args.timeout) for name, bench_args in benchmarks(args.dry_run, args.modes)}
    scaling = ["--models", "test_vit" if args.dry_run else "vit_base_patch16_224,vit_huge_patch14_224",
               "--engines", "ddp,zero2,zero3", "--nprocs", "1", "--precision", "bf16", "--out-dir",
               os.path.join(out, "scaling"), "--batch-per-rank", "2" if args.dry_run else "16"]
    scaling += ["--img-size", "32"] if args.dry_run else ["--warmup", "3", "--steps", "10"]
    commands["scaling"] = ([py, "tools/bench_scaling.py", *scaling], 2 * args.timeout)
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    # rlrr/layers/fused.py against the formula on the device itself
    commands["fused-kernels"] = ([*pytest, "tests/test_fused.py"], args.timeout)
    # data.decode: device, nvJPEG against the workers' decoder
    commands["device-decode"] = ([*pytest, "tests/test_loader.py", "-k", "decoded_on_the_device"], args.timeout)
    # train.grad_accum under CUDA graphs: compiled (whole and by blocks) with and without graphs, the same gradients
    commands["graphs-accumulate"] = ([*pytest, "tests/test_engine.py", "-k", "under_cuda_graphs"], args.timeout)
    # the compiled and fused paths' gradients at a real size (a dry run: the Triton kernels through the interpreter)
    grads = ["--set", "model.name=test_vit", "--set", "model.img_size=32", "--set", "model.timm_kwargs={depth: 2}",
             "--batch-size", "4", "--steps", "2", "--device", "cpu", "--paths", "fused"] if args.dry_run else \
        ["--set", "model.name=vit_base_patch16_224", "--batch-size", "64",
         "--paths", "cudagraphs,compiled-blocks,fused"]
    commands["compiled-gradients"] = ([py, "tools/check_gradients.py", *grads, "--json",
                                       os.path.join(out, "compiled-gradients.json")], args.timeout)
    size = ["64", "--workers", "1", "--epochs", "1", "--batch-size", "16", "--device", "cpu"] if args.dry_run else \
        ["2000", "--workers", "8", "--batch-size", "64", "--device", "cuda"]
    commands["loaders"] = ([py, "tools/bench_data.py", "--json", os.path.join(out, "loaders.json"), "--images", *size],
                           args.timeout)
    return commands


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        args.modes = dict(item.split("=", 1) for item in args.modes)
    except ValueError:
        print(f"gpu_acceptance: error: --modes {args.modes}: expected STEP=MODES", file=sys.stderr)
        return 2
    unknown = set(args.modes) - {name for name, *_ in GPU_BENCHMARKS}
    if unknown:
        print(f"gpu_acceptance: error: --modes: no bench step {sorted(unknown)}; the steps: "
              f"{', '.join(name for name, *_ in GPU_BENCHMARKS)}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_acceptance: error: no CUDA device; use --dry-run to check the steps on CPU", file=sys.stderr)
        return 2
    if args.jobs != 1 and not args.dry_run:
        print("gpu_acceptance: error: --jobs is for --dry-run; measured steps run one at a time", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out_dir)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    skip = {name: "--skip" for name in args.skip}
    if args.dry_run:  # one tiny model for every ViT: the other bench steps would repeat these
        skip.update({name: f"dry run: the same tiny model as {', '.join(DRY_RUNS)}"
                     for name, *_ in GPU_BENCHMARKS if name not in DRY_RUNS})
        skip["train-ddp-fp16"] = "fp16 needs CUDA (dry run)"
        skip.update({name: "dry run: the same eager run as train-loop" for name in DRY_SKIPPED_LOOPS})
    # Triton kernels: compiled for the GPU, or run by the interpreter on CPU in a dry run (read at import)
    os.environ["TRITON_INTERPRET"] = "1" if args.dry_run else "0"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(out, "compile_cache"))  # shared by every step
    os.environ.setdefault("TORCH_LOGS", "perf_hints")  # in each step's log: why a graph was not a CUDA graph
    commands = step_commands(args, out)
    make, runs = training_runs(out, args.dry_run)
    commands["make-shards"] = (make, args.timeout)
    for name, overrides in runs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "launch/train.py",
               "--config", os.path.join(out, "train.yaml"), "--set", f"run_name={name}", *overrides]
        commands[name] = (resume_command(cmd) if name == "train-resume" else cmd, args.timeout)
    for name in set(commands) - set(skip):  # what an earlier call left in this folder for the steps to run
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, f"{name}.json"))
        for folder in (os.path.join(out, name), os.path.join(out, "runs", name)):  # scaling/, a run's own
            shutil.rmtree(folder, ignore_errors=True)
    acceptance = Acceptance(out, args.dry_run)
    order = ORDER + [n for n in commands if n not in ORDER]
    shards = order.index("make-shards")  # the training runs read the shards: a dry run's --jobs waits for them
    for names in (order[:shards], ["make-shards"], order[shards + 1:]):
        run_all([(n, *commands[n]) for n in names if n not in skip], acceptance, args.jobs, deadline)
    acceptance.steps += [{"step": name, "ok": True, "seconds": 0.0, "skipped": why} for name, why in skip.items()]
    acceptance.write(complete=True)
    failed = [s["step"] for s in acceptance.steps if not s["ok"]]
    if failed:
        print(f"gpu_acceptance: FAILED or not run: {', '.join(failed)} (logs in {out}/logs)", file=sys.stderr)
        return 1
    print(f"gpu_acceptance: all {len(acceptance.steps)} steps passed; {out}/acceptance.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
