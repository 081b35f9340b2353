"""tools/benchmark.py, bench_scaling.py and gpu_acceptance.sh run and write complete JSON (no timing
assertions)."""
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

from rlrr.config import ModelConfig
from rlrr.model import build_model

from helpers import ROOT, run_tool, tool_main, tool_module

pytestmark = pytest.mark.integration  # a process per measured mode


def test_benchmark_pools_rounds_and_counts_ddp_bytes(tmp_path, monkeypatch):
    """Two rounds of two windows, pooled; DDP's all-reduce carries the trainable gradients only. A mode
    that fails (the Triton kernels off CUDA without the interpreter) is listed with its error while the
    others still run, and the command exits 1. (RLRR vs full fine-tuning, inference and MFU come through
    the GPU script's dry run below.)"""
    out = tmp_path / "bench.json"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    res = run_tool("benchmark.py", "--model", "test_vit", "--img-size", "32", "--batch-size", "2",
                   "--modes", "rlrr+fused,linear", "--warmup", "1", "--steps", "1", "--windows", "2", "--rounds", "2",
                   "--device", "cpu", "--no-inference", "--json", out, "--profile", "1", "--log-dir", tmp_path / "logs",
                   "--timm-kwargs", "embed_dim=32,num_heads=1", timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["training"]) == {"linear"} and "inference" not in data and data["complete"]
    assert list(data["failed"]) == ["rlrr+fused"] and "model.kernel = triton needs a CUDA device" in data["failed"][
        "rlrr+fused"] and "benchmark: error: rlrr+fused failed: " in res.stderr
    for mode, r in data["training"].items():
        assert r["mode"] == mode and r["train_img_s"] > 0 and r["peak_memory_mb"] >= 0 and r["trainable_params"] > 0
        assert len(r["window_img_s"]) == 4  # 2 windows x 2 rounds, pooled
        assert r["ddp_allreduce_bytes"] == 4 * r["trainable_params"]  # fp32 gradients of trainable parameters
        assert r["train_flops_per_image"] > 0 and r["mfu"] is None  # no GPU peak to divide by on CPU
        assert r["graph_breaks"] == 0 and r["cudagraph_skips"] == 0  # eager
        # each round's process: its phases, and the start, imports and exit around them
        assert len(r["process_s"]) == 2 and set(r["phase_s"]) == {"build", "warmup_and_windows", "profile", "count"}
        assert min(r["phase_s"].values()) >= 0 and r["process_s"][0] > sum(r["phase_s"].values())
    assert data["config"]["model"] == "test_vit" and "GFLOP/img" in res.stdout
    # --timm-kwargs reaches each mode's process: the linear probe's head is (32 + 1) x 100, not (64 + 1) x 100
    assert data["config"]["timm_kwargs"] == {"embed_dim": 32, "num_heads": 1}
    assert data["training"]["linear"]["trainable_params"] == 33 * 100
    # --log-dir keeps each worker's stderr: --profile's table of the ops that took the time (one per round),
    # the failed mode's error
    linear_log = (tmp_path / "logs" / "linear.log").read_text()
    assert linear_log.count("Self CPU time total") == 2 and "aten::addmm" in linear_log
    assert "model.kernel = triton needs a CUDA device" in (tmp_path / "logs" / "rlrr+fused.log").read_text()


def test_benchmark_rejects_bad_options(capsys):
    for args, message in ((["--modes", "rlrr,magic"], "unknown mode(s) ['magic']"),
                          (["--modes", "full+fused,rlrr+warp"], "unknown mode(s) ['full+fused', 'rlrr+warp']"),
                          (["--frozen-dtype", "bf16"], "--frozen-dtype bf16 needs --precision bf16")):
        assert tool_main("benchmark.py")(args) == 2
        assert message in capsys.readouterr().err


def test_benchmark_reads_timm_kwargs_as_yaml_values_and_names_a_bad_one(capsys):
    parse = tool_module("benchmark.py").parse_args
    args = parse(["--timm-kwargs", "embed_dim=32,qkv_bias=false,global_pool=avg,mlp_ratio=2.5"])
    assert args.timm_kwargs == {"embed_dim": 32, "qkv_bias": False, "global_pool": "avg", "mlp_ratio": 2.5}
    assert parse([]).timm_kwargs == {}
    for bad in ("embed_dim", "=32", "embed_dim=32,depth"):
        with pytest.raises(SystemExit) as e:
            parse(["--timm-kwargs", bad])
        assert e.value.code == 2
        assert "expected KEY=VALUE[,KEY=VALUE...], e.g. embed_dim=32,num_heads=1" in capsys.readouterr().err


def test_benchmark_skips_cuda_graphs_of_blocks_under_checkpointing(capsys):
    """What training falls back from (rlrr.compile.graphs_blocked) is not measured either: the mode is
    named as skipped with the reason, and with nothing left the command stops before starting a process."""
    argv = ["--grad-checkpointing", "--modes", "rlrr+cudagraphs-blocks", "--no-inference", "--device", "cpu"]
    assert tool_main("benchmark.py")(argv) == 2
    err = capsys.readouterr().err
    assert "benchmark: skipping rlrr+cudagraphs-blocks: not with model.grad_checkpointing around compiled blocks" in err
    assert "no training mode left to measure" in err


def test_bench_scaling_reports_each_cell_per_rank_and_a_failed_cell_as_failed(tmp_path):
    """ZeRO-3 with 2 processes holds half the parameters per rank; a model that does not exist is a
    failed row (and exit 1), never a number."""
    res = run_tool("bench_scaling.py", "--models", "test_vit,no_such_model", "--engines", "zero3", "--nprocs",
                   "2", "--img-size", "32", "--batch-per-rank", "2", "--num-classes", "10", "--out-dir", tmp_path,
                   timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    cells = {c["model"]: c for c in json.loads((tmp_path / "scaling.json").read_text())["cells"]}
    total = sum(p.numel() for p in build_model(ModelConfig(name="test_vit", img_size=32), 10).parameters())
    z3 = cells["test_vit"]
    assert len(z3["per_rank"]) == 2 and all(abs(r["params_held"] - total / 2) < 0.01 * total for r in z3["per_rank"])
    assert all(r["train_peak_mb"] > 0 and r["setup_peak_mb"] > 0 for r in z3["per_rank"]) and z3["img_s"] > 0
    assert cells["no_such_model"]["failed"].startswith("[rank") and "img_s" not in cells["no_such_model"]
    table = (tmp_path / "scaling.md").read_text()
    assert "| no_such_model | zero3 | 2 | failed: " in table and "| test_vit | zero3 | 2 |" in table


def test_gpu_acceptance_dry_run_takes_every_step_on_cpu(tmp_path):
    """The GPU script's steps, tiny and on CPU: every step runs (fp16 is skipped: it needs CUDA) and
    the JSON and the table are complete. Without a GPU and without --dry-run it refuses."""
    # --skip leaves out what this suite runs anyway: the
    # fused kernels', the device decoder's and the CUDA-graph accumulation tests (tests/test_fused.py,
    # test_loader.py, test_engine.py) and a loop streamed with the workers decoding (as train-zero2-bf16 is)
    skip = ["fused-kernels", "device-decode", "graphs-accumulate", "train-loop-stream"]
    res = subprocess.run(["bash", str(ROOT / "tools" / "gpu_acceptance.sh"), "--dry-run", "--jobs", "2", "--out-dir",
                          str(tmp_path), *[arg for step in skip for arg in ("--skip", step)]],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "acceptance.json").read_text())
    steps = {s["step"]: s for s in data["steps"]}
    same_model = {"bench-vit-b-64", "bench-vit-b-64-paths", "bench-vit-l-32", "bench-vit-h-16", "bench-vit-h-16-ckpt",
                  "bench-vit-h-64"}
    assert set(steps) == {"fused-kernels", "device-decode", "graphs-accumulate", "compiled-gradients",
                          "bench-vit-b-8", "bench-vit-b-64-ckpt",
                          "bench-vit-h-frozen-fp32", "scaling", "make-shards", "train-ddp-bf16", "train-ddp-fp16",
                          "train-zero2-bf16", "train-loop", "train-loop-stream", "loaders",
                          "train-loop-stream-device-decode", "train-loop-b8", "train-loop-b8-blocks",
                          "train-resume"} | same_model
    assert data["complete"] and all(s["ok"] for s in steps.values()) and steps["train-ddp-fp16"]["skipped"]
    assert all(steps[name]["skipped"].startswith("dry run: the same tiny model") for name in same_model)
    assert steps["train-loop-b8-blocks"]["skipped"] == "dry run: the same eager run as train-loop"
    assert all(steps[name]["skipped"] == "--skip" for name in skip)
    # stopped after step 10 with a checkpoint, resumed in a new process: the uninterrupted run's adapter
    assert data["training"]["train-resume"]["steps"] == data["training"]["train-ddp-bf16"]["steps"] == 20
    assert data["resume"] == {"max_abs_diff": 0.0, "bitwise": True}
    resume_log = (tmp_path / "logs" / "train-resume.log").read_text()
    assert "stopped at step 10 (epoch 1: train.max_steps reached)" in resume_log
    assert "train-resume at epoch 1 step 10 (last.pt)" in resume_log
    assert "| train-resume: its adapter against train-ddp-bf16's, the same run uninterrupted (max abs difference) " \
           "| 0.0 | <= 0.0 | yes |" in (tmp_path / "acceptance.md").read_text()
    assert (tmp_path / "logs" / "bench-vit-b-8" / "rlrr+fused.log").is_file()  # each mode's stderr, kept
    benches = data["benchmarks"]
    vit_b = benches["bench-vit-b-8"]
    # every RLRR path side by side (the Triton kernels through the interpreter here) with full and the probe
    assert set(vit_b["training"]) == {"rlrr", "rlrr+torch", "rlrr+fused", "full", "linear"}
    assert "inference" in vit_b and "inference" not in benches["bench-vit-b-64-ckpt"]
    # in bf16 the frozen linear weights are stored in bf16 by default (train.frozen_dtype auto): RLRR's stored
    # model is about half of what it is kept in fp32 (full fine-tuning has none frozen)
    bf16, fp32 = (benches[k]["training"]["rlrr"]["param_mb"] for k in ("bench-vit-b-8", "bench-vit-h-frozen-fp32"))
    assert 0.4 * fp32 < bf16 < 0.6 * fp32
    assert all(r["train_flops_per_image"] > 0 for b in data["benchmarks"].values() for r in b["training"].values())
    rlrr = {m: r["trainable_params"] for m, r in vit_b["training"].items() if m.startswith("rlrr")}
    assert len(set(rlrr.values())) == 1 and rlrr["rlrr"] < vit_b["training"]["full"]["trainable_params"]
    assert all(r["ddp_allreduce_bytes"] == 4 * r["trainable_params"] for r in vit_b["training"].values())
    assert all(vit_b["inference"][k] > 0 for k in ("infer_adapted_img_s", "infer_merged_img_s", "infer_plain_img_s",
                                                   "merged_vs_plain"))
    ratio, speed = vit_b["rlrr_vs_full"], {m: r["train_img_s"] for m, r in vit_b["training"].items()}
    fastest = max((m for m in speed if m.startswith("rlrr")), key=speed.get)
    assert ratio["rlrr_mode"] == fastest and ratio["full_mode"] == "full"
    assert ratio["speed"] == round(speed[fastest] / speed["full"], 3)
    runs = data["training"]
    assert runs["train-zero2-bf16"]["steps"] == runs["train-zero2-bf16"]["optimizer_updates"] == 20
    # the training loop (in memory; streamed, decoded where the batch lands) beside the benchmark step of the
    # path a CPU run takes by default (eager)
    assert set(data["loop_vs_benchmark"]) == {"train-loop", "train-loop-stream-device-decode"}
    for name, ratio in data["loop_vs_benchmark"].items():
        loop = runs[name]
        assert loop["steps"] == 48 and loop["compile"]["compile"] is False and loop["warmup_s"] >= 0
        assert loop["profile"]["steps"] == 5  # train.profile_steps, booked apart from its img/s
        assert ratio == {"loop_img_s": loop["img_per_s"], "bench_mode": "rlrr", "bench_img_s": speed["rlrr"],
                         "ratio": round(loop["img_per_s"] / speed["rlrr"], 3)}
    assert "train-loop-stream-device-decode: " in (tmp_path / "acceptance.md").read_text()
    md = (tmp_path / "acceptance.md").read_text()
    assert f"| {runs['train-loop']['test_acc1_final']} | 5 steps profiled: " in md
    assert "| train-zero2-bf16 | 20 | 20 |" in md and "| bench-vit-b-64-ckpt | full |" in md and "zero3" in md
    assert "| bench-vit-b-8 | rlrr+fused |" in md and "| train-ddp-fp16 | skipped: fp16 needs CUDA" in md
    fused = benches["bench-vit-b-8"]["training"]["rlrr+fused"]  # its graph breaks (eager: 0), its process's seconds
    assert f"| {fused['graph_breaks']} | 0 | {sum(fused['process_s'])} |" in md and fused["graph_breaks"] == 0
    assert "| train-loop-stream | skipped: --skip |" in md
    # the targets, from the paths a CPU run takes: measured where the dry run has the step, else "not measured"
    rows = {t["target"]: t for t in data["targets"]}
    fastest = "the fastest full fine-tuning measured (img/s)"
    assert rows[f"bench-vit-b-8: rlrr / full, {fastest}"]["value"] == round(speed["rlrr"] / speed["full"], 3)
    assert rows["bench-vit-b-8: rlrr / rlrr+torch (img/s)"]["ok"] in (True, False)
    assert rows["bench-vit-b-64: rlrr / full (peak memory)"] == {"target": "bench-vit-b-64: rlrr / full (peak memory)",
                                                                  "value": None, "goal": "<= 0.85", "ok": None}
    assert rows["train-loop: the run's img/s / its benchmark step (rlrr)"]["value"] == data["loop_vs_benchmark"][
        "train-loop"]["ratio"]
    assert "## Targets" in md and f"| bench-vit-l-32: rlrr / full, {fastest} | not measured | >= 1.0 |" in md
    # tools/check_gradients.py: the Triton kernels (interpreted) against eager float64, within the bf16 bound
    gradients = rows["compiled-gradients: RLRR's compiled and fused gradients, the largest error over its bound"]
    checked = json.loads((tmp_path / "compiled-gradients.json").read_text())["methods"]["rlrr"]["paths"]["fused"]
    assert gradients["value"] == checked["worst_ratio"] and 0 < gradients["value"] <= 1 and gradients["ok"]
    pipeline = data["input_pipeline"]  # tools/bench_data.py: the loaders, decoding in workers and on the device
    assert pipeline["device"] == "cpu" and pipeline["shards_streaming_device_decode_img_s"] > 0
    assert f"| shards_streaming_device_decode | {pipeline['shards_streaming_device_decode_img_s']:,} |" in md
    if not torch.cuda.is_available():
        res = subprocess.run(["bash", str(ROOT / "tools" / "gpu_acceptance.sh"), "--out-dir", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
        assert res.returncode == 2 and "no CUDA device; use --dry-run" in res.stderr


def test_gpu_acceptance_budget_reports_the_steps_it_did_not_run(tmp_path, monkeypatch):
    """--budget 0: no step starts (none of them is a process here); each is reported as not run, and the
    command fails. A step's outcome is written when it ends, before the command does. The report names
    the versions its figures rest on, and a missing package."""
    tool = tool_module("gpu_acceptance.py")
    monkeypatch.setattr(tool, "PACKAGES", ["timm", "no-such-package-rlrr"])
    out = tmp_path / "acc"
    (out / "runs" / "train-loop").mkdir(parents=True)  # an earlier call's outputs for steps about to run
    (out / "bench-vit-b-8.json").write_text("{}")
    (out / "runs" / "train-loop" / "results.json").write_text("{}")
    (out / "scaling").mkdir()
    (out / "scaling" / "scaling.md").write_text("| an earlier table |")
    assert tool.main(["--dry-run", "--budget", "0", "--out-dir", str(out)]) == 1
    assert not (out / "bench-vit-b-8.json").exists() and not (out / "runs" / "train-loop").exists()
    assert not (out / "scaling").exists()
    data = json.loads((out / "acceptance.json").read_text())
    steps = {s["step"]: s for s in data["steps"]}
    assert data["complete"] and not data["benchmarks"] and not data["training"] and data["scaling_md"] is None
    assert steps["fused-kernels"] == {"step": "fused-kernels", "ok": False, "seconds": 0.0,
                                      "not_run": "the time budget ran out"}
    assert all("not_run" in s for s in steps.values() if "skipped" not in s) and len(steps) == 25
    order = [s["step"] for s in data["steps"]]  # the most telling first
    assert order[:2] == ["bench-vit-b-8", "make-shards"]  # then the batch-8 loops, skipped in a dry run (listed last)
    assert order.index("fused-kernels") < order.index("train-loop") < order.index("scaling")
    md = (out / "acceptance.md").read_text()
    assert "| bench-vit-b-8 | not run: the time budget ran out | 0.0 |" in md and "Incomplete" not in md
    timm_version = importlib.metadata.version("timm")
    assert data["environment"]["timm"] == timm_version and data["environment"]["no-such-package-rlrr"] is None
    assert f"timm {timm_version}, no-such-package-rlrr NOT INSTALLED" in md

    acceptance = tool.Acceptance(str(out), True)
    acceptance.add({"step": "fused-kernels", "ok": True, "seconds": 1.5, "log": "x.log"})
    data = json.loads((out / "acceptance.json").read_text())
    assert not data["complete"] and data["steps"] == [{"step": "fused-kernels", "ok": True, "seconds": 1.5,
                                                       "log": "x.log"}]
    assert "Incomplete: written after each step" in (out / "acceptance.md").read_text()
    # a bench step cut short keeps the modes its benchmark wrote before the cut
    (out / "bench-vit-b-8.json").write_text(json.dumps({"training": {}, "failed": {"full": "OOM"}, "complete": False}))
    acceptance.add({"step": "bench-vit-b-8", "ok": False, "seconds": 200.0, "error": "exit timed out after 200 s"})
    assert json.loads((out / "acceptance.json").read_text())["benchmarks"]["bench-vit-b-8"]["complete"] is False
    assert "| bench-vit-b-8 | full | failed: OOM | | | | | | | |" in (out / "acceptance.md").read_text()


def test_gpu_acceptance_sets_each_target_beside_its_figures():
    """RLRR's default path against full fine-tuning's fastest compiled step and RLRR's eager step, peak memory
    against that full step, the best RLRR MFU on ViT-H/14 (full fine-tuning's not counted), and the loop
    against its step; what was not measured says so instead of passing or failing."""
    tool = tool_module("gpu_acceptance.py")

    def r(img_s=1.0, mb=1.0, mfu=None, breaks=0, skips=0):
        return {"train_img_s": img_s, "peak_memory_mb": mb, "mfu": mfu, "graph_breaks": breaks,
                "cudagraph_skips": skips}
    benches = {
        "bench-vit-b-8": {"training": {"rlrr+cudagraphs": r(1000), "full+compiled": r(400),
                                       "full+cudagraphs": r(1300, skips=4), "rlrr+torch": r(134),
                                       "rlrr+cudagraphs-blocks": r(600, skips=1)}},
        "bench-vit-b-64": {"training": {"rlrr+cudagraphs": r(2500, 4000), "full+compiled": r(2400, 5000),
                                        "rlrr+cudagraphs-blocks": r(2600, 3000)}},  # not the default: not read
        "bench-vit-h-16": {"training": {"full+compiled": r(mfu=0.5, breaks=5), "rlrr+fused": r(mfu=0.3, breaks=2)}},
        "bench-vit-h-64": {"training": {"rlrr+compiled-blocks": r(mfu=0.42)}},
        "bench-vit-h-frozen-fp32": {"training": {"rlrr+cudagraphs": r(2400, 3600)}},  # no target: read nowhere
    }
    loops = {"train-loop": {"ratio": 0.85, "bench_mode": "rlrr+cudagraphs"}}
    resume = {"max_abs_diff": 3e-7, "bitwise": False}
    rows = {t["target"]: (t["value"], t["goal"], t["ok"])
            for t in tool.targets(benches, loops, dry=False, resume=resume, gradients=0.31)}
    default, fastest = "rlrr+cudagraphs", "the fastest full fine-tuning measured (img/s)"
    assert rows[f"bench-vit-b-8: {default} / full+cudagraphs, {fastest}"] == (0.769, ">= 1.0", False)  # vs 1,300
    assert rows[f"bench-vit-b-8: {default} / rlrr+torch (img/s)"] == (7.463, ">= 2.0", True)
    assert rows[f"bench-vit-b-64: {default} / full+compiled, {fastest}"] == (1.042, ">= 1.0", True)
    assert rows[f"bench-vit-b-64: {default} / rlrr+torch (img/s)"] == (None, ">= 2.0", None)
    assert rows[f"bench-vit-l-32: {default} / full, {fastest}"] == (None, ">= 1.0", None)
    assert rows[f"bench-vit-b-64: {default} / full+compiled (peak memory)"] == (0.8, "<= 0.85", True)
    assert rows[f"bench-vit-h-16: {default} / full+compiled (peak memory)"] == (None, "<= 0.6", None)
    assert rows["ViT-H/14: best RLRR MFU (bench-vit-h-64 rlrr+compiled-blocks)"] == (0.42, ">= 0.4", True)
    assert rows[f"train-loop: the run's img/s / its benchmark step ({default})"] == (0.85, ">= 0.9", False)
    assert rows["graph breaks in RLRR's steps, all benchmarks"] == (2, "<= 0", False)  # full fine-tuning's not counted
    skipped = "graphs not recorded as CUDA graphs in RLRR's cudagraphs steps"
    assert rows[skipped] == (1, "<= 0", False)  # full fine-tuning's not counted
    resumed = "train-resume: its adapter against train-ddp-bf16's, the same run uninterrupted (max abs difference)"
    assert rows[resumed] == (3e-7, "<= 0.0", False)  # not bit for bit
    gradients = "compiled-gradients: RLRR's compiled and fused gradients, the largest error over its bound"
    assert rows[gradients] == (0.31, "<= 1.0", True)
    assert len(rows) == 2 * 4 + 2 + 1 + 1 + 1 + 1 + 1 + 1
    assert tool.targets({}, {}, dry=False)[-5:-2] == [
        {"target": "ViT-H/14: best RLRR MFU (not measured)", "value": None, "goal": ">= 0.4", "ok": None},
        {"target": "graph breaks in RLRR's steps, all benchmarks", "value": None, "goal": "<= 0", "ok": None},
        {"target": skipped, "value": None, "goal": "<= 0", "ok": None}]


def test_each_training_loop_is_set_beside_the_step_of_its_own_batch_and_path():
    """train-loop (batch 64, the default: the whole model as CUDA graphs) beside bench-vit-b-64's default step;
    train-loop-b8-blocks (batch 8, train.compile_scope: blocks) beside bench-vit-b-8's per-block graphs; a run
    whose step was not measured is left out, not compared with another path."""
    tool = tool_module("gpu_acceptance.py")
    runs = tool.loop_runs(dry=False)
    assert runs["train-loop-b8-blocks"] == (["data.in_memory=true", "train.compile_scope=blocks"], "bench-vit-b-8",
                                            8, "rlrr+cudagraphs-blocks")
    assert runs["train-loop-stream"][1:] == ("bench-vit-b-64", 64, "rlrr+cudagraphs")
    benches = {"bench-vit-b-64": {"training": {"rlrr+cudagraphs": {"train_img_s": 3000.0}}},
               "bench-vit-b-8": {"training": {"rlrr+cudagraphs-blocks": {"train_img_s": 1200.0}}}}
    training = {name: {"img_per_s": img_s} for name, img_s in
                (("train-loop", 2850.0), ("train-loop-b8-blocks", 1080.0), ("train-loop-b8", 500.0))}
    loops = tool.loop_vs_benchmark(training, benches, dry=False)
    assert loops == {"train-loop": {"loop_img_s": 2850.0, "bench_img_s": 3000.0, "bench_mode": "rlrr+cudagraphs",
                                    "ratio": 0.95},
                     "train-loop-b8-blocks": {"loop_img_s": 1080.0, "bench_img_s": 1200.0,
                                              "bench_mode": "rlrr+cudagraphs-blocks", "ratio": 0.9}}


def test_gpu_acceptance_modes_replace_a_bench_steps_modes_and_a_bad_one_is_named(capsys):
    """--modes STEP=MODES (a rerun of what one step measures): that step's modes change, its other options
    and the other steps stay; an unknown step or a malformed item ends the command with one line."""
    tool = tool_module("gpu_acceptance.py")
    plain, changed = (dict(tool.benchmarks(False, modes)) for modes in ({}, {"bench-vit-b-8": "rlrr+cudagraphs"}))
    assert changed["bench-vit-b-8"][-2:] == ["--modes", "rlrr+cudagraphs"]
    assert changed["bench-vit-b-8"][:-1] == plain["bench-vit-b-8"][:-1]
    assert plain["bench-vit-b-8"][-1] != "rlrr+cudagraphs"
    assert {k: v for k, v in changed.items() if k != "bench-vit-b-8"} == \
        {k: v for k, v in plain.items() if k != "bench-vit-b-8"}
    assert dict(tool.benchmarks(True, {"bench-vit-b-8": "rlrr"}))["bench-vit-b-8"][-2:] == ["--modes", "rlrr"]
    assert tool.main(["--dry-run", "--modes", "bench-vit-z=rlrr"]) == 2
    assert "--modes: no bench step ['bench-vit-z']" in capsys.readouterr().err
    assert tool.main(["--dry-run", "--modes", "bench-vit-b-8"]) == 2
    assert "expected STEP=MODES" in capsys.readouterr().err
