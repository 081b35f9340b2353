#!/usr/bin/env python
"""Singular-value analysis of trained runs: how each pre-trained weight W of the blocks changes into
the run's merged W' (the paper's analysis lens: a residual rescaling keeps the pre-trained spectrum and
singular subspaces close). Works for every method that changes W: RLRR and its variants, LoRA, SSF
(folded into the linears), full fine-tuning.

    python tools/analyze_svd.py runs/vtab/kitti                 # tables to stdout, files in runs/vtab/kitti/svd/
    python tools/analyze_svd.py runs/vtab/kitti --top-k 16 --out report/kitti-svd
    python tools/analyze_svd.py runs/cmp/rlrr runs/cmp/lora runs/cmp/full --out report/kitti-methods

Per block matrix (qkv analysed as its q, k and v parts): the relative change of the top-k singular
values, the largest principal angle between the top-k left (and right) singular subspaces before and
after, and ||W' - W||_F / ||W||_F. One run: svd.md, svd.csv, spectra.json, spectra.png (singular values
before/after for a few layers) and angles.png (per depth). Several runs of one task: the same per run
in OUT/<run name>/, and methods.md (per-run means) and methods.png (angle and spectrum drift per
depth, one line per run, side by side). The pre-trained W is rebuilt exactly as the run built it from
its config.yaml (the model.pretrained file, or the seeded initialisation for runs without one); W' is
the run's merged.safetensors.
"""
import argparse
import csv
import dataclasses
import io
import json
import os
import re
import sys

import torch

from rlrr.atomic import write_atomic, write_text_atomic
from rlrr.cli import UsageError, tool_main
from rlrr.config import ConfigError, load_config

MATRICES = ("qkv", "proj", "fc1", "fc2", "reduction")  # the block linears every method may change


def base_and_adapted(run: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """[(name, W, W')] in float64 for every block matrix of the run (qkv split into q, k, v)."""
    from safetensors.torch import load_file

    from rlrr.model import build_model
    paths = [os.path.join(run, f) for f in ("config.yaml", "adapter.safetensors", "merged.safetensors")]
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"{path} does not exist: analyze a finished run directory")
    cfg = load_config(paths[0])
    if cfg.model.method in ("linear", "bitfit"):
        raise ConfigError(f"{paths[0]}: model.method = {cfg.model.method} does not change the weight matrices")
    from safetensors import safe_open
    with safe_open(paths[1], "pt") as f:
        num_classes = json.loads(f.metadata()["num_classes"])
    plain = dataclasses.replace(cfg.model, method="linear")  # the run's pre-trained backbone, untouched
    before = build_model(plain, num_classes, seed=cfg.train.seed).state_dict()
    after = load_file(paths[2])
    out = []
    for key, w in before.items():
        path, _, leaf = key.rpartition(".")
        if leaf != "weight" or w.dim() != 2 or path.rpartition(".")[2] not in MATRICES:
            continue
        if key not in after or after[key].shape != w.shape:
            raise ConfigError(f"{paths[2]}: {key} is missing or has another shape than the run's backbone")
        w, w2 = w.double(), after[key].double()
        if path.endswith("qkv") and w.shape[0] % 3 == 0:
            out += [(f"{path}[{part}]", a, b) for part, a, b in zip("qkv", w.chunk(3), w2.chunk(3))]
        else:
            out.append((path, w, w2))
    return out


def principal_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between the column spaces of two orthonormal bases."""
    cos = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)
    return float(torch.rad2deg(torch.arccos(cos.min())))


def analyze(w: torch.Tensor, w2: torch.Tensor, k: int) -> dict:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u2, s2, vh2 = torch.linalg.svd(w2, full_matrices=False)
    k = min(k, s.numel())
    rel = ((s2[:k] - s[:k]) / s[:k]).abs()
    return {"shape": "x".join(map(str, w.shape)), "sigma1_change_pct": float((s2[0] - s[0]) / s[0] * 100),
            "topk_mean_abs_change_pct": float(rel.mean() * 100), "topk_max_abs_change_pct": float(rel.max() * 100),
            "angle_left_deg": principal_angle_deg(u[:, :k], u2[:, :k]),
            "angle_right_deg": principal_angle_deg(vh[:k].T, vh2[:k].T),
            "rel_frobenius_change": float(torch.linalg.norm(w2 - w) / torch.linalg.norm(w)),
            "spectrum_before": s.tolist(), "spectrum_after": s2.tolist()}


COLUMNS = ["layer", "shape", "sigma1_change_pct", "topk_mean_abs_change_pct", "topk_max_abs_change_pct",
           "angle_left_deg", "angle_right_deg", "rel_frobenius_change"]


def markdown(rows, k) -> str:
    head = ["layer", "shape", "Δσ1 %", f"mean abs Δσ top-{k} %", f"max abs Δσ top-{k} %", f"∠U top-{k} (°)",
            f"∠V top-{k} (°)", "‖W'−W‖/‖W‖"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape']} | {r['sigma1_change_pct']:+.2f} | "
                     f"{r['topk_mean_abs_change_pct']:.2f} | "
                     f"{r['topk_max_abs_change_pct']:.2f} | {r['angle_left_deg']:.2f} | {r['angle_right_deg']:.2f} | "
                     f"{r['rel_frobenius_change']:.4f} |")
    return "\n".join(lines) + "\n"


def _depth_and_kind(layer: str):
    m = re.search(r"(?:blocks|layers)\.(\d+)(?:\.blocks\.(\d+))?\.(.*)", layer)
    if not m:
        return None, layer
    depth = int(m.group(1)) if m.group(2) is None else int(m.group(1)) * 100 + int(m.group(2))
    return depth, m.group(3)


def plots(rows, out_dir, k) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    picks = [rows[0], rows[len(rows) // 2], rows[-1]]
    fig, axes = plt.subplots(1, len(picks), figsize=(5 * len(picks), 3.8), squeeze=False)
    for ax, r in zip(axes[0], picks):
        ax.semilogy(r["spectrum_before"], label="W (pre-trained)", color="#9aa7b8", lw=2)
        ax.semilogy(r["spectrum_after"], label="W' (merged)", color="#2f6db5", lw=1, ls="--")
        ax.set_title(r["layer"], fontsize=9)
        ax.set_xlabel("index")
        ax.set_ylabel("singular value")
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(os.path.join(out_dir, "spectra.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)

    kinds = {}
    for r in rows:
        depth, kind = _depth_and_kind(r["layer"])
        if depth is not None:
            kinds.setdefault(kind, []).append((depth, r["angle_left_deg"], r["topk_mean_abs_change_pct"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.8))
    for kind, pts in sorted(kinds.items()):
        pts.sort()
        a1.plot(range(len(pts)), [p[1] for p in pts], marker="o", ms=3, label=kind)
        a2.plot(range(len(pts)), [p[2] for p in pts], marker="o", ms=3, label=kind)
    a1.set_title(f"largest principal angle, top-{k} left singular vectors")
    a1.set_ylabel("degrees")
    a2.set_title(f"mean |relative change| of the top-{k} singular values")
    a2.set_ylabel("%")
    for a in (a1, a2):
        a.set_xlabel("block (in depth order)")
        a.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    write_atomic(os.path.join(out_dir, "angles.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_run(rows, out_dir: str, title: str, k: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomic(os.path.join(out_dir, "svd.md"), f"# SVD of the adapted weights: {title}\n\n" + markdown(rows, k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(os.path.join(out_dir, "svd.csv"), buf.getvalue())
    write_text_atomic(os.path.join(out_dir, "spectra.json"), json.dumps(
        {r["layer"]: {"before": r["spectrum_before"], "after": r["spectrum_after"]} for r in rows}))
    plots(rows, out_dir, k)


def per_depth(rows, field: str) -> list[float]:
    """The mean of ``field`` over each block's matrices, in depth order."""
    by_depth = {}
    for r in rows:
        depth, _ = _depth_and_kind(r["layer"])
        if depth is not None:
            by_depth.setdefault(depth, []).append(r[field])
    return [sum(v) / len(v) for _, v in sorted(by_depth.items())]


def methods_summary(results: dict, out_dir: str, k: int) -> str:
    """methods.md (per-run means) and methods.png (per-depth curves, one line per run)."""
    def mean(rows, f):
        return sum(r[f] for r in rows) / len(rows)
    lines = [f"| run | method | matrices | mean ∠U top-{k} (°) | mean ∠V top-{k} (°) | mean abs Δσ top-{k} % "
             "| mean ‖W'−W‖/‖W‖ |", "|---|---|---|---|---|---|---|"]
    for label, (method, rows) in results.items():
        lines.append(f"| {label} | {method} | {len(rows)} | {mean(rows, 'angle_left_deg'):.2f} | "
                     f"{mean(rows, 'angle_right_deg'):.2f} | {mean(rows, 'topk_mean_abs_change_pct'):.2f} | "
                     f"{mean(rows, 'rel_frobenius_change'):.4f} |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(os.path.join(out_dir, "methods.md"), "# Pre-trained weights vs merged weights, per run\n\n"
                      + text)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    panels = [("angle_left_deg", f"largest principal angle, top-{k} left singular vectors (°)"),
              ("topk_mean_abs_change_pct", f"mean |relative change| of the top-{k} singular values (%)"),
              ("rel_frobenius_change", "||W' - W|| / ||W|| (log)")]
    for ax, (field, title) in zip(axes, panels):
        for label, (method, rows) in results.items():
            ys = per_depth(rows, field)
            ax.plot(range(len(ys)), ys, marker="o", ms=3, label=f"{label} ({method})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("block (in depth order)")
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    fig.tight_layout()
    write_atomic(os.path.join(out_dir, "methods.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return text


@tool_main("analyze_svd")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished run directories (config.yaml, adapter.safetensors, "
                                            "merged.safetensors); several: runs of one task to compare")
    ap.add_argument("--top-k", type=int, default=8, help="how many leading singular values / vectors to compare")
    ap.add_argument("--out", help="output directory (default: RUN/svd; required with several runs)")
    args = ap.parse_args(argv)
    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if len(args.runs) > 1 and not args.out:
        raise UsageError("--out is required with several runs")
    results = {}
    for run in args.runs:
        label = os.path.basename(os.path.normpath(run))
        label = label if label not in results else f"{label}-{len(results)}"
        mats = base_and_adapted(run)
        method = load_config(os.path.join(run, "config.yaml")).model.method
        rows = [{"layer": name, **analyze(w, w2, args.top_k)} for name, w, w2 in mats]
        out_dir = os.path.join(args.out, label) if len(args.runs) > 1 else (args.out or os.path.join(run, "svd"))
        write_run(rows, out_dir, run, args.top_k)
        results[label] = (method, rows)
        if len(args.runs) == 1:
            print(markdown(rows, args.top_k))
        print(f"wrote {out_dir}/svd.md, svd.csv, spectra.json, spectra.png, angles.png ({len(rows)} matrices)")
    if len(args.runs) > 1:
        print(methods_summary(results, args.out, args.top_k))
        print(f"wrote {args.out}/methods.md, methods.png ({len(results)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
