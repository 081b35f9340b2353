#!/usr/bin/env python
"""The VTAB-1k / FGVC protocol in one command (rlrr/protocol.py): a grid on train scored on val, the
best setting retrained on train+val over several seeds, tested once each, and the paper's table.

    python tools/protocol.py --suite vtab --seeds 3 --out-dir runs/protocol-vtab            # one machine
    python tools/protocol.py --suite fgvc --scheduler slurm --max-parallel 16 \\
        --sbatch "--gpus-per-node=1 --partition=a100" --out-dir runs/protocol-fgvc          # a cluster
    python tools/protocol.py configs/vtab/kitti.yaml configs/vtab/dtd.yaml --method lora \\
        --grid train.lr=1e-3,3e-3 --grid model.drop_path=0.0,0.1 --dry-run                  # the plan only

On one machine each run gets --gpus-per-run GPUs (all runs in flight at once that fit), or a share of
the cores. On SLURM the grid is a job array; a job after it selects and submits the retraining array,
and a last job writes the report. Writes <out-dir>/protocol.md, protocol.json, selection.json,
report.csv and report.png. Call it again to resume: finished runs are reused.
"""
import argparse
import os
import shlex
import subprocess
import sys

from rlrr.cli import UsageError, tool_main
from rlrr.protocol import (
    DEFAULT_GRIDS,
    EST_IMG_PER_S,
    Plan,
    estimate_s,
    markdown,
    parse_grid,
    read_task,
    report,
    run_cost,
    select,
)
from rlrr.sweep import repo_root, run_jobs


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", help="task configs (default: every task of --suite)")
    ap.add_argument("--suite", choices=sorted(DEFAULT_GRIDS), default="vtab")
    ap.add_argument("--method", default="rlrr", help="configs/methods/<name>.yaml over each task ('' for none)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="a gridded key (repeatable); given, it replaces the default lr x weight decay grid")
    ap.add_argument("--seeds", type=int, default=3, help="retraining seeds per task")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run")
    ap.add_argument("--out-dir", default="runs/protocol")
    ap.add_argument("--gpus-per-run", type=int, default=1, help="processes (GPUs) per run")
    ap.add_argument("--parallel", type=int, help="runs at once on one machine (default: GPUs / --gpus-per-run, "
                                                   "on CPUs 1)")
    ap.add_argument("--scheduler", choices=["local", "slurm"], default="local")
    ap.add_argument("--max-parallel", type=int, help="SLURM: array tasks running at once")
    ap.add_argument("--sbatch", default="", help="SLURM: options for the training arrays' sbatch")
    ap.add_argument("--timeout", type=float, help="seconds per run attempt (local)")
    ap.add_argument("--dry-run", action="store_true", help="print every run and the estimated cost, start nothing")
    ap.add_argument("--stage", choices=["select", "report"], help=argparse.SUPPRESS)  # the SLURM chain's own steps
    return ap.parse_args(argv)


def make_plan(args) -> Plan:
    if args.seeds < 1 or args.gpus_per_run < 1:
        raise UsageError("--seeds and --gpus-per-run must be >= 1")
    configs = args.configs or sorted(
        os.path.join(repo_root(), "configs", args.suite, f) for f in os.listdir(os.path.join(repo_root(), "configs",
                                                                                            args.suite))
        if f.endswith(".yaml") and f != "base.yaml")
    tasks = [read_task(c, args.set) for c in configs]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UsageError(f"two task configs share a name: {sorted(names)}")
    grid = parse_grid(args.grid) if args.grid else DEFAULT_GRIDS[args.suite]
    seeds = [42 + k for k in range(args.seeds)]  # 42: the reference's seed
    return Plan(tasks, grid, seeds, args.method or None, os.path.abspath(args.out_dir), args.gpus_per_run, args.set)


def print_plan(plan: Plan) -> None:
    """Every run the protocol would start (retraining: at the grid's first point, until selection
    decides) and the device-hours it should take."""
    total = {"grid": 0.0, "retrain": 0.0}
    for task in plan.tasks:
        for stage, jobs in (("grid", plan.grid_jobs(task)), ("retrain", plan.retrain_jobs(task, plan.points()[0]))):
            results = [job.results() for job in jobs]  # each read once
            measured = [c for c in map(run_cost, results) if c]
            for job, done in zip(jobs, results):
                total[stage] += 0.0 if done else estimate_s(plan, stage, task, measured)
                print(f"{stage} {job.label}: {'reused' if done else ' '.join(map(shlex.quote, job.command()))}")
    runs = len(plan.tasks) * (len(plan.points()) + len(plan.seeds))
    print(f"protocol: {len(plan.tasks)} tasks, {runs} runs; estimated device-hours still to spend: grid "
          f"{total['grid'] / 3600:.2f}, retrain {total['retrain'] / 3600:.2f}, total {sum(total.values()) / 3600:.2f} "
          f"(until runs are measured: epochs x images at {EST_IMG_PER_S:.0f} img/s per GPU, plus a minute per process)")


def run_local(plan: Plan, args) -> int:
    import torch
    parallel = args.parallel or max(1, torch.cuda.device_count() // plan.nproc)
    grid = [j for t in plan.tasks for j in plan.grid_jobs(t)]
    run_jobs(grid, parallel, retries=1, timeout=args.timeout, tool="protocol")
    selection = select(plan)
    retrain = [j for t in plan.tasks if selection[t.name]["point"] is not None
               for j in plan.retrain_jobs(t, selection[t.name]["point"])]
    run_jobs(retrain, parallel, retries=1, timeout=args.timeout, tool="protocol")
    return finish(plan, selection)


def finish(plan: Plan, selection: dict) -> int:
    out = report(plan, selection)
    print(markdown(out, {}))
    failed = [t["task"] for t in out["tasks"] if t["status"] != "ok"]
    if failed:
        print(f"protocol: FAILED tasks: {', '.join(failed)} (their runs' errors are in protocol.md)", file=sys.stderr)
    print(f"protocol: {plan.out}/protocol.md, protocol.json, report.csv, report.png")
    return 1 if failed else 0


def sbatch(*options, cwd: str, env: dict = None) -> str:
    cmd = ["sbatch", "--parsable", *options]
    print("protocol: " + " ".join(map(shlex.quote, cmd)), flush=True)
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise UsageError(f"sbatch failed: {res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]


def submit_array(plan: Plan, args, stage: str, jobs, after: str = None) -> str:
    """One array task per unfinished run (train.sbatch with --config-list), each retried once by
    torchrun (MAX_RESTARTS=1); None when every run has finished."""
    todo = [j for j in jobs if j.results() is None]
    if not todo:
        return None
    for job in todo:
        job.compose()
    listing = os.path.join(plan.out, stage, "configs.txt")
    with open(listing, "w") as f:
        f.write("".join(j.config_path + "\n" for j in todo))
    array = f"0-{len(todo) - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    env = {"MAX_RESTARTS": "1", "NPROC_PER_NODE": str(plan.nproc), "PYTHON": os.environ.get("PYTHON", sys.executable)}
    return sbatch(f"--array={array}", f"--job-name=rlrr-{stage}", f"--output={plan.out}/{stage}/slurm-%A_%a.out",
                  *([f"--dependency=afterany:{after}"] if after else []), *shlex.split(args.sbatch),
                  "launch/slurm/train.sbatch", "--config-list", listing, "--resume", "auto", cwd=repo_root(), env=env)


def submit_step(plan: Plan, args, stage: str, after: str = None) -> str:
    """A one-process job that runs this command again at ``stage`` (select, report), from this
    working directory (so relative paths mean the same)."""
    argv = [sys.executable, os.path.abspath(__file__), *args.argv, "--stage", stage]
    return sbatch(f"--job-name=rlrr-{stage}", f"--output={plan.out}/{stage}-%j.out", "--ntasks=1",
                  *([f"--dependency=afterany:{after}"] if after else []), "--wrap", " ".join(map(shlex.quote, argv)),
                  cwd=os.getcwd())


@tool_main("protocol")
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else map(str, argv))
    args = parse_args(argv)
    args.argv = [a for i, a in enumerate(argv) if a != "--stage" and (i == 0 or argv[i - 1] != "--stage")]
    plan = make_plan(args)
    if args.dry_run:
        print_plan(plan)
        return 0
    os.makedirs(plan.out, exist_ok=True)
    if args.scheduler == "local":
        return run_local(plan, args)
    if args.stage == "report":
        return finish(plan, select(plan))
    if args.stage == "select":
        selection = select(plan)
        retrain = [j for t in plan.tasks if selection[t.name]["point"] is not None
                   for j in plan.retrain_jobs(t, selection[t.name]["point"])]
        submit_step(plan, args, "report", after=submit_array(plan, args, "retrain", retrain))
        return 0
    grid = submit_array(plan, args, "grid", [j for t in plan.tasks for j in plan.grid_jobs(t)])
    select_job = submit_step(plan, args, "select", after=grid)
    print(f"protocol: submitted grid {grid or '(all finished)'} -> select {select_job} (it submits the retraining "
          f"array and the report); results in {plan.out}/protocol.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
