#!/usr/bin/env python
"""Singular-value analysis of a trained RLRR run: how each adapted weight W changes into the merged
W' = W * (1 + s_out s_in^T) (the paper's analysis lens: a residual rescaling keeps the pre-trained
spectrum and singular subspaces close).

    python tools/analyze_svd.py runs/vtab/kitti                 # tables to stdout, files in runs/vtab/kitti/svd/
    python tools/analyze_svd.py runs/vtab/kitti --top-k 16 --out report/kitti-svd

Per adapted matrix (a fused qkv is analysed as its q, k and v parts, each with its own s_in):
the relative change of the top-k singular values, the largest principal angle between the top-k
left (and right) singular subspaces before and after, and ||W' - W||_F / ||W||_F. Writes svd.md,
svd.csv, spectra.png (singular values before/after for a few layers) and angles.png (per depth).
The pre-trained W is rebuilt exactly as the run built it from its config.yaml (the
model.pretrained file, or the seeded initialisation for runs without one).
"""
import argparse
import csv
import io
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rlrr.adapter import load_adapter  # noqa: E402
from rlrr.atomic import write_atomic, write_text_atomic  # noqa: E402
from rlrr.config import ConfigError, load_config  # noqa: E402
from rlrr.layers import RLRRLinear, rescaled_weight  # noqa: E402


def base_and_adapted(run: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """[(name, W, W')] in float64 for every adapted matrix of the run (q/k/v split)."""
    from rlrr.model import build_model
    cfg_path, adapter_path = os.path.join(run, "config.yaml"), os.path.join(run, "adapter.safetensors")
    for path in (cfg_path, adapter_path):
        if not os.path.isfile(path):
            raise ConfigError(f"{path} does not exist: analyze a finished run directory")
    cfg = load_config(cfg_path)
    if cfg.model.method != "rlrr":
        raise ConfigError(f"{cfg_path}: model.method = {cfg.model.method}; only RLRR runs have adapted weights")
    from safetensors import safe_open
    with safe_open(adapter_path, "pt") as f:
        num_classes = json.loads(f.metadata()["num_classes"])
    model = build_model(cfg.model, num_classes, seed=cfg.train.seed)  # the run's own initial model
    load_adapter(model, adapter_path)
    out = []
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, RLRRLinear):
                continue
            w = m.weight.double()
            w2 = rescaled_weight(w, m.scale_in.double(), m.scale_out.double())
            if m.in_groups == 3 and name.endswith("qkv"):
                for part, a, b in zip("qkv", w.chunk(3), w2.chunk(3)):
                    out.append((f"{name}[{part}]", a, b))
            else:
                out.append((name, w, w2))
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
    head = ["layer", "shape", "Δσ1 %", f"mean |Δσ| top-{k} %", f"max |Δσ| top-{k} %", f"∠U top-{k} (°)",
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished run directory (config.yaml, adapter.safetensors)")
    ap.add_argument("--top-k", type=int, default=8, help="how many leading singular values / vectors to compare")
    ap.add_argument("--out", help="output directory (default: RUN/svd)")
    args = ap.parse_args(argv)
    if args.top_k < 1:
        print(f"analyze_svd: error: --top-k must be >= 1, got {args.top_k}", file=sys.stderr)
        return 2
    try:
        mats = base_and_adapted(args.run)
    except (ConfigError, ValueError, OSError) as e:
        print(f"analyze_svd: error: {e}", file=sys.stderr)
        return 2
    rows = [{"layer": name, **analyze(w, w2, args.top_k)} for name, w, w2 in mats]
    out_dir = args.out or os.path.join(args.run, "svd")
    os.makedirs(out_dir, exist_ok=True)
    text = markdown(rows, args.top_k)
    print(text)
    write_text_atomic(os.path.join(out_dir, "svd.md"), f"# SVD of the adapted weights: {args.run}\n\n" + text)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(os.path.join(out_dir, "svd.csv"), buf.getvalue())
    write_text_atomic(os.path.join(out_dir, "spectra.json"), json.dumps(
        {r["layer"]: {"before": r["spectrum_before"], "after": r["spectrum_after"]} for r in rows}))
    plots(rows, out_dir, args.top_k)
    print(f"wrote {out_dir}/svd.md, svd.csv, spectra.json, spectra.png, angles.png ({len(rows)} matrices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
