#!/usr/bin/env python
"""Collect results.json from runs and print the VTAB-1k / FGVC tables in the paper's layout, with
the paper's RLRR row (ViT-B/16, docs/method.md, section 7) beside ours and the difference.

    python tools/report.py runs/vtab-20261124/                      # Markdown to stdout
    python tools/report.py runs/vtab-*/ runs/fgvc-*/ --csv report.csv --png report.png --md report.md
    python tools/report.py runs/vtab/ --metric at_best_val         # train800 -> val200 selection

A run is a directory holding results.json; its task is the run directory's name (the config file's
name: configs/vtab/kitti.yaml -> kitti). Several runs of one task (seeds) are averaged and counted.
A missing task is shown as missing and its group mean as incomplete: never averaged as zero.
"""
import argparse
import json
import os
import sys

from rlrr.atomic import write_text_atomic
from rlrr.cli import tool_main
from rlrr.paper import FGVC, VTAB, markdown, rows, write_csv, write_png

METRICS = {"final": ("test_acc1_final", "test top-1 at the final epoch"),
           "at_best_val": ("test_acc1_at_best_val", "test top-1 at the epoch with the best validation accuracy"),
           "best_over_epochs": ("test_acc1_best_over_epochs",
                                "best test top-1 over epochs (the reference protocol; selects on the test set)")}


class ReportError(ValueError):
    pass


def find_runs(paths) -> list[str]:
    """Every directory under ``paths`` (or a path itself) that holds a results.json."""
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise ReportError(f"{path}: not a directory")
        found = sorted(root for root, _, files in os.walk(path) if "results.json" in files)
        if not found:
            raise ReportError(f"{path}: no results.json under it (runs that did not finish have none)")
        runs += found
    return runs


def collect(runs, metric_key: str) -> tuple[dict, list[str]]:
    """{task name: [values]} and the run directories that match no known task."""
    known = {t.name.lower(): t.name for t in VTAB + FGVC}
    values, unmatched = {}, []
    for run in runs:
        name = os.path.basename(os.path.normpath(run))
        task = known.get(name.lower())
        if task is None:
            unmatched.append(run)
            continue
        path = os.path.join(run, "results.json")
        try:
            with open(path) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: cannot read it as JSON ({e})") from None
        value = results.get(metric_key)
        if value is None:
            raise ReportError(f"{path}: {metric_key} is missing or null (for at_best_val, train with a val_split)")
        values.setdefault(task, []).append(float(value))
    return values, unmatched


@tool_main("report", errors=(ReportError,))
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories, or directories holding runs")
    ap.add_argument("--metric", choices=sorted(METRICS), default="final")
    ap.add_argument("--md", help="also write the Markdown here")
    ap.add_argument("--csv", help="write the table (one row per task and mean) as CSV here")
    ap.add_argument("--png", help="write a bar chart (ours vs paper per task) here")
    args = ap.parse_args(argv)
    key, label = METRICS[args.metric]
    values, unmatched = collect(find_runs(args.runs), key)
    for run in unmatched:
        print(f"report: warning: {run} is not a VTAB-1k or FGVC task name; left out", file=sys.stderr)
    tables = {}
    if any(t.name in values for t in VTAB):
        tables["vtab"] = rows(VTAB, values, "vtab")
    if any(t.name in values for t in FGVC):
        tables["fgvc"] = rows(FGVC, values, "fgvc")
    if not tables:
        raise ReportError("no run matches a VTAB-1k or FGVC task")
    titles = {"vtab": "VTAB-1k", "fgvc": "FGVC"}
    text = f"RLRR, {label}; paper: ViT-B/16 (ImageNet-21k).\n\n" + "\n".join(
        markdown(titles[s], t) for s, t in tables.items())
    print(text)
    if args.md:
        write_text_atomic(args.md, text)
    if args.csv:
        write_csv(args.csv, tables)
    if args.png:
        write_png(args.png, tables, label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
