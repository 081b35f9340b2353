"""tools/benchmark.py runs and writes complete JSON (no timing assertions)."""
import json

import pytest

from helpers import run_tool

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
