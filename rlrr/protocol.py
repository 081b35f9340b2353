"""The VTAB-1k / FGVC protocol in one command (tools/protocol.py):

1. grid: for every task, each point of a grid (train.lr x train.weight_decay by default, any config
   key with --grid) trained on the task's train split and scored on its val split: the test split is
   not read (the run's test_split is the val split);
2. select: per task, the point with the best val top-1 at the final epoch; a tie goes to the point
   listed first in the grid;
3. retrain: that point trained on train+val for each of --seeds seeds, each tested once on test;
4. report: per task the chosen point, its val top-1 and test mean +- std over the seeds, per group and
   overall means, the paper's row beside them (rlrr.paper), and what each stage cost.

Splits come from the shards' manifest: VTAB-1k's train800 / val200 / train800val200, or train / val /
trainval (FGVC's VPT json, or any ImageFolder or IDX dataset sharded with --val-split). Runs go to
<out>/grid/<task>-<point> and <out>/retrain/<task>-seed<k>; a finished run is reused and an
interrupted one resumes, so a second call picks up where the first stopped. On one machine the runs
share its GPUs or cores (rlrr.sweep); on SLURM each stage is a job array, chained by dependencies.
"""
import itertools
import json
import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Optional

import yaml

from . import paper
from .atomic import write_json_atomic, write_text_atomic
from .cli import UsageError
from .config import ConfigError, load_config
from .data.manifest import open_manifest
from .errors import ManifestError
from .sweep import Job, last_error, repo_root

DEFAULT_GRIDS = {  # the values the reference recipe uses across each suite's tasks (docs/method.md, section 6)
    "vtab": {"train.lr": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2], "train.weight_decay": [5e-5, 5e-2]},
    "fgvc": {"train.lr": [1e-4, 5e-4, 1e-3, 3e-3], "train.weight_decay": [5e-2]},
}
SPLITS = (("train800", "val200", "train800val200"), ("train", "val", "trainval"))  # (train, val, train+val)
EST_IMG_PER_S = 1000.0  # per GPU, RLRR ViT-B/16 (for the plan's estimate until runs have been measured)
EST_START_S = 60.0  # per run: start-up, evaluations and the final export


@dataclass
class Task:
    name: str  # the config file's name
    config: str
    train: str
    val: str
    trainval: str
    test: str
    epochs: int
    samples: dict  # split -> samples


@dataclass
class Plan:
    tasks: list[Task]
    grid: dict  # key -> values, in order
    seeds: list[int]
    method: Optional[str]  # configs/methods/<method>.yaml laid over each task, or None
    out: str
    nproc: int = 1
    overrides: list[str] = field(default_factory=list)  # --set, for every run

    def points(self) -> list[dict]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]

    def _job(self, stage: str, label: str, task: Task, overrides: list[str]) -> Job:
        bases = [task.config] + ([os.path.join(repo_root(), "configs", "methods", f"{self.method}.yaml")]
                                 if self.method else [])
        return Job(label, bases, [*self.overrides, *overrides], os.path.join(self.out, stage), self.nproc)

    def grid_jobs(self, task: Task) -> list[Job]:
        return [self._job("grid", f"{task.name}-{point_label(p)}", task,
                          [f"data.train_split={task.train}", "data.val_split=null", f"data.test_split={task.val}",
                           *(f"{k}={json.dumps(v)}" for k, v in p.items())])
                for p in self.points()]

    def retrain_jobs(self, task: Task, point: dict) -> list[Job]:
        return [self._job("retrain", f"{task.name}-seed{seed}", task,
                          [f"data.train_split={task.trainval}", "data.val_split=null", f"data.test_split={task.test}",
                           *(f"{k}={json.dumps(v)}" for k, v in point.items()), f"train.seed={seed}"])
                for seed in self.seeds]


def point_label(point: dict) -> str:
    """``train.lr=0.003, train.weight_decay=0.05`` -> ``lr0.003-weight_decay0.05`` (a run name)."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{k.rsplit('.', 1)[-1]}{v}") for k, v in point.items())


def parse_grid(items: list[str]) -> dict:
    """``--grid key=v1,v2`` (repeatable) -> {key: [v1, v2]}; values are YAML (numbers, null, true)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"--grid {item!r}: expected key=value1,value2,...")
        grid[key] = [_value(v) for v in values.split(",")]
    return grid


def _value(text: str):
    """A YAML value; a number YAML 1.1 reads as a string ("1e-3") is a number."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def read_task(config: str, overrides: list[str]) -> Task:
    """A task: its config checked, its splits found in the manifest of its shards."""
    cfg = load_config(config, overrides)
    try:
        manifest = open_manifest(cfg.data)
    except ManifestError as e:
        raise ConfigError(f"{config}: {e}") from None
    have = set(manifest.data["splits"])
    found = next((s for s in SPLITS if set(s) <= have), None)
    if found is None:
        raise ConfigError(f"{config}: {manifest.path} has splits {sorted(have)}; the protocol needs "
                          f"{' or '.join('/'.join(s) for s in SPLITS)} (tools/make_shards.py --val-split N makes "
                          "train/val/trainval)")
    if cfg.data.test_split not in have:
        raise ConfigError(f"{config}: data.test_split = {cfg.data.test_split!r} is not in {manifest.path}")
    samples = {s: manifest.split(s).num_samples for s in (*found, cfg.data.test_split)}
    name = os.path.splitext(os.path.basename(config))[0]
    return Task(name, config, *found, cfg.data.test_split, cfg.train.epochs, samples)


def select(plan: Plan) -> dict:
    """{task: {"point", "val_acc1", "grid": [...]}}: the best val top-1 over the task's finished grid
    runs (the first listed wins a tie); "point" is None when none finished."""
    selection = {}
    for task in plan.tasks:
        scored = []
        for point, job in zip(plan.points(), plan.grid_jobs(task)):
            r = job.results()
            scored.append({"point": point, "run": job.label, "val_acc1": r["test_acc1_final"] if r else None,
                           "cost_s": run_cost(r), "device": r.get("device") if r else None})
        finished = [s for s in scored if s["val_acc1"] is not None]
        best = max(finished, key=lambda s: s["val_acc1"]) if finished else None  # max keeps the first of equals
        selection[task.name] = {"point": best["point"] if best else None,
                                "val_acc1": best["val_acc1"] if best else None, "grid": scored}
    write_json_atomic(os.path.join(plan.out, "selection.json"), selection)
    return selection


def run_cost(results: Optional[dict]) -> Optional[float]:
    """Device-seconds of a finished run: its process time (setup, training, evaluation, export; summed
    over restarts) times its processes."""
    if not results or results.get("run_s") is None:
        return None
    return results["run_s"] * results["world_size"]


def estimate_s(plan: Plan, stage: str, task: Task, measured: list[float]) -> float:
    """Device-seconds of one run of ``stage`` for ``task``: the mean of the runs already measured, else
    epochs x samples / EST_IMG_PER_S plus EST_START_S per process."""
    if measured:
        return sum(measured) / len(measured)
    split = task.train if stage == "grid" else task.trainval
    return task.epochs * task.samples[split] / EST_IMG_PER_S + EST_START_S * plan.nproc


def report(plan: Plan, selection: dict) -> dict:
    """protocol.json and protocol.md (per task: chosen point, val top-1, test mean +- std, cost; the
    paper's table beside ours), report.csv and report.png."""
    tasks, costs, devices = [], {"grid": 0.0, "retrain": 0.0}, set()
    for task in plan.tasks:
        chosen = selection[task.name]
        costs["grid"] += sum(g["cost_s"] or 0.0 for g in chosen["grid"])
        runs = plan.retrain_jobs(task, chosen["point"]) if chosen["point"] is not None else []
        results = [(job, job.results()) for job in runs]
        tests = [r["test_acc1_final"] for _, r in results if r]
        costs["retrain"] += sum(run_cost(r) or 0.0 for _, r in results)
        devices |= {g["device"] for g in chosen["grid"]} | {r.get("device") for _, r in results if r}
        failed = [job for job, r in results if r is None] if runs else plan.grid_jobs(task)
        tasks.append({"task": task.name, "point": chosen["point"], "val_acc1": chosen["val_acc1"],
                      "test_acc1": tests, "test_mean": statistics.fmean(tests) if tests else None,
                      "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0 if tests else None,
                      "seeds": len(tests), "failed": [j.label for j in failed],
                      "errors": [last_error(j.log_path) for j in failed],
                      "status": "ok" if tests and len(tests) == len(plan.seeds) else "FAILED"})
    # the runs' own devices, not this process's (a SLURM report job may run on a CPU node)
    unit = "GPU-hours" if "cuda" in devices else "CPU process-hours"
    out = {"grid": plan.grid, "seeds": plan.seeds, "method": plan.method, "tasks": tasks,
           "cost": {stage: round(s / 3600, 4) for stage, s in costs.items()} | {"total": round(sum(costs.values()) /
                                                                                                3600, 4)},
           "cost_unit": unit}
    out["groups"], tables = _paper_tables(tasks)
    write_json_atomic(os.path.join(plan.out, "protocol.json"), out)
    text = markdown(out, tables)
    write_text_atomic(os.path.join(plan.out, "protocol.md"), text)
    if tables:
        paper.write_csv(os.path.join(plan.out, "report.csv"), tables)
        paper.write_png(os.path.join(plan.out, "report.png"), tables, "test top-1, mean over seeds")
    return out


def _paper_tables(tasks: list[dict]) -> tuple[dict, dict]:
    """Group means of ours (complete groups only), and the paper's tables for the suites present."""
    values, groups = {}, {}
    for t in tasks:
        mean = t["test_mean"] if t["status"] == "ok" else None  # a task missing a seed has no number
        found = paper.find_task(t["task"])
        groups.setdefault(found[1].group if found else "other", []).append(mean)
        if found and mean is not None:
            values[found[1].name] = [mean]
    means = {g: (statistics.fmean(v) if None not in v else None) for g, v in groups.items()}
    every = [t["test_mean"] if t["status"] == "ok" else None for t in tasks]
    means["all"] = statistics.fmean(every) if None not in every else None
    tables = {}
    for suite, known in (("vtab", paper.VTAB), ("fgvc", paper.FGVC)):
        if any(t.name in values for t in known):
            tables[suite] = paper.rows(known, values, suite)
    return means, tables


def markdown(out: dict, tables: dict) -> str:
    def pct(v):
        return "—" if v is None else f"{v:.2f}"
    lines = [f"Protocol: grid {json.dumps(out['grid'])} on train, scored on val (best val top-1, the first listed "
             f"wins a tie); retrained on train+val with seeds {out['seeds']}, tested once each.", "",
             "| task | chosen | val top-1 | test top-1 (mean ± std) | seeds | status |", "|---|---|---|---|---|---|"]
    for t in out["tasks"]:
        chosen = ", ".join(f"{k}={v}" for k, v in t["point"].items()) if t["point"] else "—"
        test = f"{pct(t['test_mean'])} ± {t['test_std']:.2f}" if t["test_mean"] is not None else "—"
        status = t["status"] if t["status"] == "ok" else \
            "FAILED (" + "; ".join(f"{run}: {error}" for run, error in zip(t["failed"], t["errors"])) + ")"
        lines.append(f"| {t['task']} | {chosen} | {pct(t['val_acc1'])} | {test} | {t['seeds']} | {status} |")
    lines += ["", "Means: " + ", ".join(f"{g} {pct(m)}" for g, m in out["groups"].items()) + ".", "",
              f"Cost ({out['cost_unit']}): " + ", ".join(f"{k} {v:.3f}" for k, v in out["cost"].items()) + ".", ""]
    titles = {"vtab": "VTAB-1k", "fgvc": "FGVC"}
    return "\n".join(lines) + "".join("\n" + paper.markdown(titles[s], t) for s, t in tables.items())
