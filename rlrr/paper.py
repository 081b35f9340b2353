"""The paper's VTAB-1k and FGVC numbers (RLRR, ViT-B/16 ImageNet-21k; docs/method.md, section 7) and the
tables that put a set of our results beside them: per task, per group and overall, a missing task
shown as missing and a group with one never averaged. Used by tools/report.py and tools/protocol.py.
"""
import csv
import io
from dataclasses import dataclass
from typing import Optional

from .atomic import write_atomic, write_text_atomic


@dataclass(frozen=True)
class Task:
    name: str    # the config / run directory name
    label: str   # the paper's column heading
    group: str
    paper: float


# The paper's RLRR row, ViT-B/16 ImageNet-21k (docs/method.md, section 7), in the paper's column order.
VTAB = [Task(*t) for t in [
    ("cifar", "CIFAR-100", "Natural", 75.6), ("caltech101", "Caltech101", "Natural", 92.4),
    ("dtd", "DTD", "Natural", 72.9), ("oxford_flowers102", "Flowers102", "Natural", 99.3),
    ("oxford_iiit_pet", "Pets", "Natural", 91.5), ("svhn", "SVHN", "Natural", 89.8),
    ("sun397", "Sun397", "Natural", 57.0),
    ("patch_camelyon", "Camelyon", "Specialized", 86.8), ("eurosat", "EuroSAT", "Specialized", 95.2),
    ("resisc45", "Resisc45", "Specialized", 85.3), ("diabetic_retinopathy", "Retinopathy", "Specialized", 75.9),
    ("clevr_count", "Clevr-Count", "Structured", 79.7), ("clevr_dist", "Clevr-Dist", "Structured", 64.2),
    ("dmlab", "DMLab", "Structured", 53.9), ("kitti", "KITTI-Dist", "Structured", 82.1),
    ("dsprites_loc", "dSpr-Loc", "Structured", 83.9), ("dsprites_ori", "dSpr-Ori", "Structured", 53.7),
    ("smallnorb_azi", "sNORB-Azim", "Structured", 33.4), ("smallnorb_ele", "sNORB-Ele", "Structured", 43.6),
]]
FGVC = [Task(*t) for t in [
    ("CUB_200_2011", "CUB-200-2011", "FGVC", 89.3), ("NABirds", "NABirds", "FGVC", 84.7),
    ("OxfordFlowers", "Oxford Flowers", "FGVC", 99.5), ("StanfordDogs", "Stanford Dogs", "FGVC", 92.0),
    ("StanfordCars", "Stanford Cars", "FGVC", 87.0),
]]
# The means as the paper prints them (from unrounded per-task numbers, so they can differ from the
# mean of the rounded row above in the last digit).
PAPER_MEANS = {"vtab": {"Natural": 82.7, "Specialized": 85.8, "Structured": 61.8, "Mean (19 tasks)": 74.5,
                        "Mean (3 groups)": 76.7},
               "fgvc": {"Mean": 90.4}}


def find_task(name: str) -> Optional[tuple[str, Task]]:
    """("vtab" or "fgvc", the task) for a task name (a config file's name, any case), or None."""
    for suite, tasks in (("vtab", VTAB), ("fgvc", FGVC)):
        for t in tasks:
            if t.name.lower() == name.lower():
                return suite, t
    return None


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def rows(tasks, values, suite) -> list[dict]:
    """One row per task, then the group means and overall means (complete groups only)."""
    out = []
    for t in tasks:
        v = values.get(t.name)
        out.append({"kind": "task", "group": t.group, "name": t.label, "ours": _mean(v) if v else None,
                    "runs": len(v or []), "paper": t.paper})
    if suite == "fgvc":
        ours = [r["ours"] for r in out]
        out.append({"kind": "mean", "group": "FGVC", "name": "Mean", "runs": None, "paper": PAPER_MEANS["fgvc"]["Mean"],
                    "ours": _mean(ours) if None not in ours else None,
                    "present": f"{sum(o is not None for o in ours)}/{len(ours)}"})
        return out
    groups = {}
    for r in out:
        groups.setdefault(r["group"], []).append(r["ours"])
    group_means = {}
    for g, ours in groups.items():
        group_means[g] = _mean(ours) if None not in ours else None
        out.append({"kind": "mean", "group": g, "name": g, "ours": group_means[g], "runs": None,
                    "paper": PAPER_MEANS["vtab"][g], "present": f"{sum(o is not None for o in ours)}/{len(ours)}"})
    all_ours = [r["ours"] for r in out if r["kind"] == "task"]
    n_present = sum(o is not None for o in all_ours)
    out.append({"kind": "mean", "group": "all", "name": "Mean (19 tasks)", "runs": None,
                "ours": _mean(all_ours) if n_present == len(all_ours) else None,
                "paper": PAPER_MEANS["vtab"]["Mean (19 tasks)"], "present": f"{n_present}/{len(all_ours)}"})
    gm = list(group_means.values())
    out.append({"kind": "mean", "group": "all", "name": "Mean (3 groups)", "runs": None,
                "ours": _mean(gm) if None not in gm else None, "paper": PAPER_MEANS["vtab"]["Mean (3 groups)"],
                "present": f"{sum(m is not None for m in gm)}/{len(gm)} groups"})
    return out


def _fmt(v, signed=False):
    return "missing" if v is None else (f"{v:+.1f}" if signed else f"{v:.1f}")


def markdown(title, table) -> str:
    cols = [r["name"] for r in table]
    ours = [r["ours"] for r in table]
    lines = [f"### {title}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| RLRR (paper) | " + " | ".join(_fmt(r["paper"]) for r in table) + " |",
             "| RLRR (ours) | " + " | ".join(
                 _fmt(o) if o is not None or r["kind"] == "task" else f"incomplete ({r['present']})"
                 for o, r in zip(ours, table)) + " |",
             "| ours - paper | " + " | ".join(
                 _fmt(None if o is None else o - r["paper"], signed=True) for o, r in zip(ours, table)) + " |"]
    partial = [(r["ours"], r["paper"]) for r in table if r["kind"] == "task" and r["ours"] is not None]
    missing = [r["name"] for r in table if r["kind"] == "task" and r["ours"] is None]
    if missing and partial:
        ours_m, paper_m = _mean([o for o, _ in partial]), _mean([p for _, p in partial])
        lines += ["", f"Missing: {', '.join(missing)}. On the {len(partial)} tasks present: ours {ours_m:.1f}, "
                      f"paper {paper_m:.1f} ({ours_m - paper_m:+.1f})."]
    repeats = [f"{r['name']} x{r['runs']}" for r in table if r["kind"] == "task" and r["runs"] > 1]
    if repeats:
        lines += ["", "Averaged over several runs: " + ", ".join(repeats) + "."]
    return "\n".join(lines) + "\n"


def write_csv(path, tables) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["suite", "kind", "group", "name", "ours", "runs", "paper", "diff"])
    for suite, table in tables.items():
        for r in table:
            w.writerow([suite, r["kind"], r["group"], r["name"], "" if r["ours"] is None else f"{r['ours']:.2f}",
                        "" if r["runs"] is None else r["runs"], f"{r['paper']:.1f}",
                        "" if r["ours"] is None else f"{r['ours'] - r['paper']:.2f}"])
    write_text_atomic(path, buf.getvalue())


def write_png(path, tables, metric_label) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(tables), 1, figsize=(14, 4.2 * len(tables)), squeeze=False)
    for ax, (suite, table) in zip(axes[:, 0], tables.items()):
        x = range(len(table))
        ax.bar([i - 0.2 for i in x], [r["paper"] for r in table], 0.4, label="RLRR (paper)", color="#9aa7b8")
        ax.bar([i + 0.2 for i in x], [r["ours"] or 0 for r in table], 0.4, label="RLRR (ours)", color="#2f6db5")
        for i, r in zip(x, table):
            if r["ours"] is None:
                ax.text(i + 0.2, 2, "missing", rotation=90, ha="center", va="bottom", fontsize=8, color="#b02020")
        ax.set_xticks(list(x), [r["name"] for r in table], rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{suite.upper()}: {metric_label}")
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
