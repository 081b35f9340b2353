#!/usr/bin/env python
"""Compare fine-tuning methods on the same shards under the same recipe, each run through
launch/train.py under torchrun in its own run directory, then write a table, JSON and a plot.

    python tools/compare.py --config configs/demo.yaml --methods rlrr,lora,ssf,bitfit,full,linear \\
        --out-dir runs/compare
    python tools/compare.py --config configs/vtab/kitti.yaml --nproc 8 --methods rlrr,full \\
        --variant "rlrr-r10=rlrr model.rlrr.rank=10" --variant "rlrr-no1=rlrr model.rlrr.form=plain"

``--parallel N`` runs N at once (on a GPU machine each on its own GPUs, on CPUs each with its share of
the cores). A method is a file
configs/methods/<name>.yaml laid over the task config (what differs per method,
e.g. full fine-tuning's lr, lives there); ``--variant LABEL=METHOD OVERRIDES...`` adds a run with
extra ``key=value`` overrides; ``--set`` applies to every run. A finished run (results.json present)
is reused, an interrupted one resumes from its checkpoint, so the command can simply be run again.
Writes <out-dir>/compare.md, compare.json and compare.png (test top-1 vs trainable parameters, log
x axis). A run that fails or leaves no results is listed as such, never as a number.
"""
import argparse
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import yaml

from rlrr.atomic import write_json_atomic, write_text_atomic
from rlrr.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS_DIR = os.path.join(ROOT, "configs", "methods")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def plan(methods: str, variants: list[str]) -> list[tuple[str, str, list[str]]]:
    """[(label, method file, overrides)]; a clear error for an unknown method or a bad label."""
    runs = [(m, m, []) for m in methods.split(",") if m] if methods else []
    for v in variants:
        label, sep, rest = v.partition("=")
        words = shlex.split(rest)
        if not sep or not words:
            raise SystemExit(f"compare: --variant {v!r}: expected LABEL=METHOD [key=value ...]")
        runs.append((label, words[0], words[1:]))
    for label, method, _ in runs:
        if not LABEL.fullmatch(label):
            raise SystemExit(f"compare: run label {label!r}: expected letters, digits, '_', '.', '+', '-'")
        if not os.path.isfile(os.path.join(METHODS_DIR, f"{method}.yaml")):
            known = sorted(f[:-5] for f in os.listdir(METHODS_DIR) if f.endswith(".yaml"))
            raise SystemExit(f"compare: method {method!r} (run {label}): no configs/methods/{method}.yaml; "
                             f"known: {', '.join(known)}")
    labels = [r[0] for r in runs]
    if len(set(labels)) != len(labels) or not labels:
        raise SystemExit(f"compare: expected distinct run labels, got {labels}")
    return runs


def run_one(args, label: str, method: str, overrides: list[str], gpus: Optional[str] = None) -> dict:
    out = os.path.abspath(args.out_dir)
    run_dir = os.path.join(out, label)
    row = {"label": label, "method_file": f"configs/methods/{method}.yaml", "overrides": overrides,
           "run_dir": run_dir}
    results = os.path.join(run_dir, "results.json")
    if os.path.isfile(results) and not args.rerun:
        row["status"] = "reused"
    else:
        composed = os.path.join(out, f"{label}.yaml")
        write_text_atomic(composed, yaml.safe_dump({
            "base": [os.path.abspath(args.config), os.path.join(METHODS_DIR, f"{method}.yaml")],
            "output_dir": out, "run_name": label}))
        try:  # a bad config fails here, in one line, before any process starts
            load_config(composed, [*args.set, *overrides])
        except ConfigError as e:
            row["status"] = f"failed (config): {e}"
            print(f"compare: {label}: {row['status']}", file=sys.stderr, flush=True)
            return row
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               os.path.join(ROOT, "launch", "train.py"), "--config", composed]
        for kv in [*args.set, *overrides]:
            cmd += ["--set", kv]
        print(f"compare: {label}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t0 = time.time()
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {}))
        if args.parallel > 1 and gpus is None and "OMP_NUM_THREADS" not in os.environ:
            # CPU runs side by side share the cores instead of each taking all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (args.parallel * args.nproc)))
        with open(os.path.join(out, f"{label}.log"), "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        row["launch_s"] = round(time.time() - t0, 1)
        if rc != 0:
            row["status"] = f"failed ({'timed out' if rc == 'timeout' else f'exit {rc}'}): {last_error(out, label)}"
            print(f"compare: {label}: {row['status']}", file=sys.stderr, flush=True)
            return row
        row["status"] = "ok"
    if not os.path.isfile(results):
        row["status"] = "missing: no results.json"
        return row
    with open(results) as f:
        r = json.load(f)
    row.update({k: r.get(k) for k in ("method", "model", "trainable_params", "test_acc1_final",
                                      "test_acc1_at_best_val", "wall_time_s", "peak_memory_mb", "epochs",
                                      "world_size")})
    return row


def run_all(args, runs: list) -> list[dict]:
    """Each run in order, ``--parallel`` at a time; on a GPU machine slot k owns GPUs
    k*nproc .. (k+1)*nproc - 1, so concurrent runs never share a device."""
    if args.parallel <= 1:
        return [run_one(args, *r) for r in runs]
    import torch
    gpus = torch.cuda.device_count()
    if gpus and gpus < args.parallel * args.nproc:
        raise SystemExit(f"compare: --parallel {args.parallel} x --nproc {args.nproc} needs "
                         f"{args.parallel * args.nproc} GPUs, this machine has {gpus}")
    slots = queue.Queue()
    for k in range(args.parallel):
        slots.put(",".join(str(k * args.nproc + i) for i in range(args.nproc)) if gpus else None)

    def one(run):
        slot = slots.get()
        try:
            return run_one(args, *run, gpus=slot)
        finally:
            slots.put(slot)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        return list(pool.map(one, runs))


def last_error(out: str, label: str) -> str:
    """The run's own one-line error if it printed one, else the log's last line."""
    with open(os.path.join(out, f"{label}.log"), errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    errors = [ln for ln in lines if re.match(r"\S+: error: ", ln)] or [ln for ln in lines if "error" in ln.lower()]
    return ((errors or lines or ["no output"])[-1])[:300]


def fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(rows: list[dict], config: str) -> str:
    lines = [f"Task config: `{config}`", "",
             "| run | method | trainable params | test top-1 final | test top-1 @ best val | train time (s) "
             "| peak memory (MB) | status |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r["status"] in ("ok", "reused")
        missing = "FAILED" if r["status"].startswith("failed") else "MISSING"
        lines.append(f"| {r['label']} | {r.get('method', '—')} | "
                     f"{fmt(r.get('trainable_params'), ',d') if ok else '—'} | "
                     f"{fmt(r.get('test_acc1_final'), '.2f') if ok else missing} | "
                     f"{fmt(r.get('test_acc1_at_best_val'), '.2f') if ok else '—'} | "
                     f"{fmt(r.get('wall_time_s'), '.0f') if ok else '—'} | "
                     f"{fmt(r.get('peak_memory_mb'), ',.0f') if ok else '—'} | {r['status']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    done = [r for r in rows if r["status"] in ("ok", "reused") and r.get("test_acc1_final") is not None]
    for r in done:
        ax.scatter(r["trainable_params"], r["test_acc1_final"], s=40)
        ax.annotate(r["label"], (r["trainable_params"], r["test_acc1_final"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    failed = [r["label"] for r in rows if r not in done]
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test top-1 (%), final epoch")
    ax.set_title(title + (f"\nnot shown (failed or missing): {', '.join(failed)}" if failed else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the task config every run starts from")
    ap.add_argument("--methods", default="rlrr,lora,ssf,bitfit,full,linear",
                    help="comma-separated names of configs/methods/*.yaml ('' for variants only)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD [key=value ...]")
    ap.add_argument("--set", action="append", default=[], metavar="key=value", help="override for every run")
    ap.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun --nproc_per_node)")
    ap.add_argument("--out-dir", default="runs/compare")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run (default: none)")
    ap.add_argument("--parallel", type=int, default=1,
                    help="runs at once; with GPUs each run gets its own --nproc of them (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--rerun", action="store_true", help="train again even where results.json exists")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.config):
        print(f"compare: error: config file not found: {args.config}", file=sys.stderr)
        return 2
    try:
        runs = plan(args.methods, args.variant)
        if args.parallel < 1 or args.nproc < 1:
            raise SystemExit("compare: --parallel and --nproc must be >= 1")
    except SystemExit as e:
        print(f"compare: error: {str(e).removeprefix('compare: ')}", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    rows = run_all(args, runs)
    out = os.path.abspath(args.out_dir)
    write_json_atomic(os.path.join(out, "compare.json"), {"config": args.config, "nproc": args.nproc,
                                                           "date": time.strftime("%Y-%m-%d"), "runs": rows})
    md = markdown(rows, args.config)
    write_text_atomic(os.path.join(out, "compare.md"), md)
    plot(rows, os.path.join(out, "compare.png"), os.path.basename(args.config))
    print(md)
    bad = [r["label"] for r in rows if r["status"] not in ("ok", "reused")]
    if bad:
        print(f"compare: {len(bad)} of {len(rows)} runs failed or left no results: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"compare: {out}/compare.md, compare.json, compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
