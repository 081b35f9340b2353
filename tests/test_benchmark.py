"""tools/benchmark.py, bench_scaling.py and gpu_acceptance.sh run and write complete JSON (no timing
assertions)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, run_tool

pytestmark = pytest.mark.integration  # a process per measured mode


def test_benchmark_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    res = run_tool("benchmark.py", "--model", "test_vit", "--img-size", "32", "--batch-size", "2",
                   "--modes", "rlrr,full,linear", "--warmup", "1", "--steps", "1", "--windows", "2", "--rounds", "2",
                   "--device", "cpu", "--json", out, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["training"]) == {"rlrr", "full", "linear"}
    for mode, r in data["training"].items():
        assert r["mode"] == mode and r["train_img_s"] > 0 and r["peak_memory_mb"] >= 0 and r["trainable_params"] > 0
        assert len(r["window_img_s"]) == 4  # 2 windows x 2 rounds, pooled
        assert r["ddp_allreduce_bytes"] == 4 * r["trainable_params"]  # fp32 gradients of trainable parameters
    t = data["training"]
    assert t["linear"]["trainable_params"] < t["rlrr"]["trainable_params"] < t["full"]["trainable_params"]
    inf = data["inference"]
    assert all(inf[k] > 0 for k in ("infer_adapted_img_s", "infer_merged_img_s", "infer_plain_img_s",
                                    "merged_vs_plain"))
    assert set(data["rlrr_vs_full"]) == {"speed", "memory"} and data["config"]["model"] == "test_vit"
    assert "rlrr vs full: speed" in res.stdout


def test_benchmark_bf16_frozen_weights_halve_the_stored_model(tmp_path):
    out = tmp_path / "bench.json"
    res = run_tool("benchmark.py", "--model", "test_vit", "--img-size", "32", "--batch-size", "2",
                   "--modes", "rlrr,full", "--warmup", "1", "--steps", "1", "--windows", "1", "--rounds", "1",
                   "--device", "cpu", "--precision", "bf16", "--frozen-dtype", "bf16", "--json", out, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "bf16 on cpu, frozen weights in bf16" in res.stdout
    t = json.loads(out.read_text())["training"]
    # full fine-tuning keeps every weight in fp32 (all trainable); RLRR's frozen linear weights are bf16
    assert 0.4 * t["full"]["param_mb"] < t["rlrr"]["param_mb"] < 0.6 * t["full"]["param_mb"]


def test_benchmark_rejects_bad_options():
    for args, message in ((["--modes", "rlrr,magic"], "unknown mode(s) ['magic']"),
                          (["--frozen-dtype", "bf16"], "--frozen-dtype bf16 needs --precision bf16")):
        res = run_tool("benchmark.py", *args, timeout=120)
        assert res.returncode == 2 and message in res.stderr, res.stderr


def test_bench_scaling_reports_each_cell_per_rank_and_a_failed_cell_as_failed(tmp_path):
    """ZeRO-3 with 2 processes holds half the parameters per rank; a model that does not exist is a
    failed row (and exit 1), never a number."""
    res = run_tool("bench_scaling.py", "--models", "test_vit,no_such_model", "--engines", "ddp,zero3", "--nprocs",
                   "2", "--img-size", "32", "--batch-per-rank", "2", "--out-dir", tmp_path, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    cells = {(c["model"], c["engine"]): c for c in json.loads((tmp_path / "scaling.json").read_text())["cells"]}
    ddp, z3 = cells["test_vit", "ddp"], cells["test_vit", "zero3"]
    assert [r["params_held"] for r in ddp["per_rank"]] == [ddp["params_total"]] * 2
    assert all(abs(r["params_held"] - ddp["params_total"] / 2) < 0.01 * ddp["params_total"] for r in z3["per_rank"])
    assert all(r["train_peak_mb"] > 0 and r["setup_peak_mb"] > 0 for c in (ddp, z3) for r in c["per_rank"])
    assert ddp["img_s"] > 0 and z3["img_s"] > 0
    assert "failed" in cells["no_such_model", "ddp"] and "img_s" not in cells["no_such_model", "ddp"]
    table = (tmp_path / "scaling.md").read_text()
    assert "| no_such_model | zero3 | 2 | failed: " in table and "| test_vit | zero3 | 2 |" in table


def test_gpu_acceptance_dry_run_takes_every_step_on_cpu(tmp_path):
    """The GPU script's steps, tiny and on CPU: every step runs (fp16 is skipped: it needs CUDA) and
    the JSON and the table are complete. Without a GPU and without --dry-run it refuses."""
    res = subprocess.run(["bash", str(ROOT / "tools" / "gpu_acceptance.sh"), "--dry-run", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "acceptance.json").read_text())
    steps = {s["step"]: s for s in data["steps"]}
    assert set(steps) == {"bench-vit-b", "bench-vit-b-ckpt", "bench-vit-h", "bench-vit-h-ckpt",
                          "bench-vit-h-frozen-bf16", "scaling", "make-shards", "train-ddp-bf16", "train-ddp-fp16",
                          "train-zero2-bf16"}
    assert all(s["ok"] for s in steps.values()) and steps["train-ddp-fp16"]["skipped"]
    assert set(data["benchmarks"]["bench-vit-b"]["training"]) == {"rlrr", "full"}
    assert all(r["train_gflops_per_image"] > 0 for b in data["benchmarks"].values() for r in b["training"].values())
    runs = data["training"]
    assert runs["train-zero2-bf16"]["steps"] == runs["train-ddp-bf16"]["optimizer_updates"] == 20
    md = (tmp_path / "acceptance.md").read_text()
    assert "| train-ddp-bf16 | 20 | 20 |" in md and "| bench-vit-h-ckpt | full |" in md and "zero3" in md
    if not torch.cuda.is_available():
        res = subprocess.run(["bash", str(ROOT / "tools" / "gpu_acceptance.sh"), "--out-dir", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
        assert res.returncode == 2 and "no CUDA device; use --dry-run" in res.stderr
