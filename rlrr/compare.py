"""Compare fine-tuning methods on the same shards under the same recipe, each run through
launch/train.py under torchrun in its own run directory (rlrr.sweep), then write a table, JSON and a
plot. The command is tools/compare.py.

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
import os
import re
import shlex
import sys
import time

from .atomic import write_json_atomic, write_text_atomic
from .cli import UsageError, tool_main
from .sweep import Job, repo_root, run_jobs

LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
RESULT_KEYS = ("method", "model", "trainable_params", "test_acc1_final", "test_acc1_at_best_val", "wall_time_s",
               "peak_memory_mb", "epochs", "world_size")


def methods_dir() -> str:
    return os.path.join(repo_root(), "configs", "methods")


def plan(methods: str, variants: list[str]) -> list[tuple[str, str, list[str]]]:
    """[(label, method file, overrides)]; a clear error for an unknown method or a bad label."""
    runs = [(m, m, []) for m in methods.split(",") if m] if methods else []
    for v in variants:
        label, sep, rest = v.partition("=")
        words = shlex.split(rest)
        if not sep or not words:
            raise UsageError(f"--variant {v!r}: expected LABEL=METHOD [key=value ...]")
        runs.append((label, words[0], words[1:]))
    for label, method, _ in runs:
        if not LABEL.fullmatch(label):
            raise UsageError(f"run label {label!r}: expected letters, digits, '_', '.', '+', '-'")
        if not os.path.isfile(os.path.join(methods_dir(), f"{method}.yaml")):
            known = sorted(f[:-5] for f in os.listdir(methods_dir()) if f.endswith(".yaml"))
            raise UsageError(f"method {method!r} (run {label}): no configs/methods/{method}.yaml; "
                             f"known: {', '.join(known)}")
    labels = [r[0] for r in runs]
    if len(set(labels)) != len(labels) or not labels:
        raise UsageError(f"expected distinct run labels, got {labels}")
    return runs


def row_of(swept: dict, method: str) -> dict:
    """A table row from rlrr.sweep's: the run's status and the results.json figures compared."""
    row = {"label": swept["label"], "method_file": f"configs/methods/{method}.yaml", "overrides": swept["overrides"],
           "run_dir": swept["run_dir"], "status": swept["status"]}
    if "launch_s" in swept:
        row["launch_s"] = swept["launch_s"]
    row.update({k: swept["results"].get(k) for k in RESULT_KEYS} if "results" in swept else {})
    return row


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


@tool_main("compare")
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
        raise UsageError(f"config file not found: {args.config}")
    runs = plan(args.methods, args.variant)
    if args.parallel < 1 or args.nproc < 1:
        raise UsageError("--parallel and --nproc must be >= 1")
    os.makedirs(args.out_dir, exist_ok=True)
    jobs = [Job(label, [args.config, os.path.join(methods_dir(), f"{method}.yaml")], [*args.set, *overrides],
                args.out_dir, args.nproc) for label, method, overrides in runs]
    rows = [row_of(r, method) for r, (_, method, _) in zip(
        run_jobs(jobs, args.parallel, timeout=args.timeout, rerun=args.rerun, tool="compare"), runs)]
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

