"""Faults from outside the process: corrupted checkpoints, changed configs, processes killed while
they write a checkpoint (faults injected by tests/faults/sitecustomize.py on PYTHONPATH)."""
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch

from rlrr.config import ConfigError

from helpers import (
    FAULTS_PATH,
    assert_same_tensors,
    comparable_adapter,
    entry_point,
    run_adapter,
    train_cmd,
    train_many,
    write_config,
)

_entry = entry_point()
cli, main = _entry.cli, _entry.main

FAULTS = FAULTS_PATH


@pytest.fixture(scope="module")
def straight(tiny_shards, tmp_path_factory):
    """An uninterrupted single-process run to compare with."""
    tmp = tmp_path_factory.mktemp("straight")
    main(["--config", write_config(tmp / "straight.yaml", tiny_shards, tmp / "runs")])
    return tmp / "runs" / "straight"


def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(tiny_shards, tmp_path, straight, capsys):
    cfg = write_config(tmp_path / "fb.yaml", tiny_shards, tmp_path / "runs", train={"save_every_steps": 2})
    assert main(["--config", cfg, "--set", "train.max_steps=5"]) == {"stopped_at_step": 5}
    ckpt = tmp_path / "runs" / "fb" / "checkpoints"
    assert torch.load(ckpt / "prev.pt", weights_only=True)["state"]["global_step"] == 4
    size = (ckpt / "last.pt").stat().st_size
    with open(ckpt / "last.pt", "r+b") as f:  # a crash that left half a file
        f.truncate(size // 2)
    main(["--config", cfg, "--resume", "latest"])
    out = capsys.readouterr().out
    assert "skipped unreadable checkpoint(s) last.pt: RuntimeError" in out and "using prev.pt" in out
    assert_same_tensors(run_adapter(tmp_path / "runs" / "fb"), run_adapter(straight))


def test_nothing_readable_left_is_one_clear_error(tiny_shards, tmp_path):
    cfg = write_config(tmp_path / "gone.yaml", tiny_shards, tmp_path / "runs", train={"save_every_steps": 2})
    main(["--config", cfg, "--set", "train.max_steps=3"])
    ckpt = tmp_path / "runs" / "gone" / "checkpoints"
    (ckpt / "last.pt").write_bytes(b"")
    (ckpt / "prev.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match=r"checkpoints: no usable checkpoint \(last.pt: .*; prev.pt: .*\)") as e:
        main(["--config", cfg, "--resume", "latest"])
    assert "\n" not in str(e.value)


def test_resume_refuses_a_changed_config_unless_told(tiny_shards, tmp_path):
    cfg = write_config(tmp_path / "chg.yaml", tiny_shards, tmp_path / "runs")
    # as a checkpoint from before the "auto" defaults says: the same training as "auto" here (fp32, eager)
    main(["--config", cfg, "--set", "train.max_steps=3", "train.frozen_dtype=fp32", "train.compile_scope=blocks"])
    with pytest.raises(ConfigError, match=r"resume: the config changed since the checkpoint: "
                                          r"model.drop_path \(0.1 -> 0.0\), train.lr \(0.01 -> 0.02\); "
                                          r"pass --allow-config-change"):
        main(["--config", cfg, "--resume", "latest", "--set", "train.lr=0.02", "model.drop_path=0.0"])
    # bf16 storage is a change: "auto" with bf16 matmuls (fp32 from the checkpoint)
    with pytest.raises(ConfigError, match=r"train.frozen_dtype \('fp32' -> 'bf16'\), train.precision \('fp32' -> "):
        main(["--config", cfg, "--resume", "latest", "--set", "train.precision=bf16"])
    # run length and logging may change; with the flag anything may
    assert main(["--config", cfg, "--resume", "latest", "--set", "train.max_steps=4", "train.log_every=2"]) == \
        {"stopped_at_step": 4}
    results = main(["--config", cfg, "--resume", "latest", "--allow-config-change", "--set", "train.lr=0.02"])
    assert results["steps"] == 12


def _torchrun(cfg, run_name, env=None, restarts=0):
    cmd = train_cmd("--config", cfg, "--set", f"run_name={run_name}", nproc=2)
    cmd.insert(cmd.index("--standalone") + 1, f"--max-restarts={restarts}")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["ddp", "zero3"])  # the two checkpoint writers: torch files, DeepSpeed tags
def test_killed_while_writing_a_checkpoint_restarts_and_equals_an_uninterrupted_run(engine, tiny_shards, tmp_path,
                                                                                    uninterrupted):
    """torchrun --max-restarts=1; rank 0 is SIGKILLed half-way through writing its third checkpoint:
    the restarted workers resume from the last complete one and finish with the same adapter."""
    # ZeRO-3: tests/test_scale.py's run (no drop-path, no flip: it is compared with DDP there)
    run = {} if engine == "ddp" else {"model": {"drop_path": 0.0}, "data": {"flip": False},
                                      "train": {"engine": "deepspeed", "zero_stage": 3}}
    straight = uninterrupted(**run)
    train = {**run.get("train", {}), "save_every_steps": 4}
    cfg = write_config(tmp_path / f"{engine}.yaml", tiny_shards, tmp_path / "runs", **{**run, "train": train})
    saves_per_checkpoint = 1 if engine == "ddp" else 2  # DeepSpeed: model states + rank 0's optimizer shard
    env = {"PYTHONPATH": FAULTS, "RLRR_FAULT_KILL_IN_SAVE": str(2 * saves_per_checkpoint + 1),
           "RLRR_FAULT_ONCE": str(tmp_path / "fired")}
    res = _torchrun(cfg, "killed", env, restarts=1)
    assert (tmp_path / "fired").exists(), res.stderr[-3000:]  # the fault did fire
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed" in res.stdout and "at epoch 1 step 6" in res.stdout, res.stdout[-2000:]
    killed = tmp_path / "runs" / "killed"
    assert_same_tensors(run_adapter(killed), run_adapter(straight))
    a, b = (json.loads((r / "results.json").read_text()) for r in (killed, straight))
    assert a["history"] == b["history"] and a["steps"] == b["steps"] == 12


@pytest.mark.integration
@pytest.mark.parametrize("drop_path,scope", [(0.0, "blocks"), (0.2, "model"), (0.0, "model"), (0.2, "blocks")])
def test_compiled_run_killed_and_restarted_equals_an_uninterrupted_compiled_run(tiny_shards, tmp_path, drop_path,
                                                                                scope):
    """train.compile=true (inductor's C++ backend here; by blocks, as a CPU run and runs across processes
    compile, and whole, as a one-process GPU run does): the compiled run trains like the eager one; a compiled
    run SIGKILLed while writing its third checkpoint and restarted by torchrun ends with the uninterrupted
    compiled run's adapter bit for bit, and compiles no graph anew (the output_dir's compile cache, filled by
    the first run). Both compiled runs start the same way (torchrun, one process), as a requeued job does.
    With a drop-path schedule (DropAtRate's random numbers, drawn in the compiled graphs) too, compiled whole;
    compiled and eager graphs draw different random numbers, so only the run without dropout is compared
    with the eager one."""
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "c.yaml", tiny_shards, runs,
                       model={"drop_path": drop_path, "timm_kwargs": {"depth": 2}}, train={"save_every_steps": 4})
    compiled = [*train_cmd("--config", cfg, "--set", "train.compile=true", f"train.compile_scope={scope}", nproc=1)]
    compiled.insert(compiled.index("--standalone") + 1, "--max-restarts=1")
    res = subprocess.run(compiled + ["run_name=straight"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "first step:" in res.stdout and "(compiling)" in res.stdout, res.stderr[-3000:]
    straight = json.loads((runs / "straight" / "results.json").read_text())
    comp = run_adapter(runs / "straight")
    if not drop_path:
        _compiled_trains_like_eager(cfg, comp, straight, runs, scope)
    cache = runs / "compile_cache"

    def graphs():
        return {p for p in cache.rglob("*") if p.is_file() and "fxgraph" in p.parts}
    compiled_graphs = graphs()
    assert compiled_graphs  # inductor wrote its graphs to the run's cache
    env = {"PYTHONPATH": FAULTS, "RLRR_FAULT_KILL_IN_SAVE": "3", "RLRR_FAULT_ONCE": str(tmp_path / "fired")}
    res = subprocess.run(compiled + ["run_name=killed"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env})
    assert (tmp_path / "fired").exists() and res.returncode == 0, res.stderr[-3000:]
    assert "resumed" in res.stdout and "(compiling)" in res.stdout, res.stdout[-2000:]
    assert_same_tensors(run_adapter(runs / "killed"), comp)
    assert graphs() == compiled_graphs
    assert straight["compile"]["scope"] == scope
    assert f"torch.compile {'whole' if scope == 'model' else 'by blocks'}, CUDA graphs off" in res.stdout


def _compiled_trains_like_eager(cfg, comp: dict, straight: dict, runs, scope: str) -> None:
    eager = main(["--config", cfg, "--set", "run_name=eager", "train.compile=false"])
    plain = run_adapter(runs / "eager")
    assert comp.keys() == plain.keys()
    for k in plain:
        got = comp[k].clone()
        if k.endswith("attn.qkv.bias_shift"):  # the key part's true gradient is 0 (softmax ignores a shift of
            # every key's logit by q.b_k): it trains on rounding noise alone, which AdamW divides by its own
            # running size (up to ~lr a step), and it has no effect on the outputs. Compared: q and v.
            third = len(got) // 3
            got[third:2 * third] = plain[k][third:2 * third]
        torch.testing.assert_close(got, plain[k], rtol=1e-4, atol=1e-4, msg=k)
    assert straight["test_acc1_final"] == eager["test_acc1_final"]
    cache = runs / "compile_cache"
    assert straight["compile"] == {"compile": True, "cuda_graphs": False, "scope": scope, "cache_dir": str(cache)}
    assert eager["compile"]["compile"] is False and straight["warmup_s"] > 0


def _faulty(env: dict, tmp_path) -> dict:
    return {"PYTHONPATH": FAULTS, "RLRR_FAULT_ONCE": str(tmp_path / "fired"), **env}


@pytest.mark.integration
def test_nan_loss_is_skipped_on_every_rank_and_counted(tiny_shards, tmp_path):
    """train.nonfinite: skip (the default); the NaN comes on rank 1 only, at its 5th training loss."""
    cfg = write_config(tmp_path / "skip.yaml", tiny_shards, tmp_path / "runs")
    res = _torchrun(cfg, "skip", _faulty({"RLRR_FAULT_NAN_AT": "5", "RLRR_FAULT_RANK": "1"}, tmp_path))
    assert res.returncode == 0 and (tmp_path / "fired").exists(), res.stderr[-3000:]
    assert "step 5: non-finite loss; the step was dropped on every rank (1 dropped so far)" in res.stdout
    run = tmp_path / "runs" / "skip"
    results = json.loads((run / "results.json").read_text())
    assert results["nonfinite_skipped"] == 1 and results["steps"] == 12
    assert all(torch.isfinite(t).all() for t in run_adapter(run).values())
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["state"]["nonfinite_skipped"] == 1
    assert all(torch.isfinite(t).all() for t in saved["trainable"].values())


@pytest.mark.integration
def test_a_nan_inside_an_accumulation_window_drops_the_whole_window_under_every_engine(tiny_shards, tmp_path):
    """grad_accum 2; rank 1's 6th loss (the second micro-batch of step 3) is NaN, after the first one's
    backward. DDP and ZeRO-3 drop the whole window and train the same adapter (ZeRO 0 and 1 clear it
    the same way); ZeRO-2 cannot clear what it accumulated, so it stops with one line instead of
    leaking it into the next update."""
    cfg = write_config(tmp_path / "w.yaml", tiny_shards, tmp_path / "runs", model={"drop_path": 0.0},
                       data={"flip": False}, train={"grad_accum": 2})
    adapters = {}
    for name, train in (("ddp", []), ("zero3", ["train.engine=deepspeed", "train.zero_stage=3"]),
                        ("zero2", ["train.engine=deepspeed", "train.zero_stage=2"])):
        env = {**_faulty({"RLRR_FAULT_NAN_AT": "6", "RLRR_FAULT_RANK": "1"}, tmp_path),
               "RLRR_FAULT_ONCE": str(tmp_path / f"fired-{name}")}
        cmd = train_cmd("--config", cfg, "--set", f"run_name={name}", *train, nproc=2)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
        assert (tmp_path / f"fired-{name}").exists(), name
        if name == "zero2":
            assert res.returncode != 0 and "exitcode  : 3" in res.stderr
            errors = [line for line in res.stderr.splitlines() if line.startswith("train: error:")]
            assert errors == ["train: error: non-finite loss at step 3 inside an accumulation window: DeepSpeed "
                              "ZeRO-2 cannot drop the gradients the window already accumulated; the last checkpoint "
                              "holds the last finite state (ZeRO-1/3 or grad_accum 1 drop the window)"], res.stderr
            continue
        assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
        assert "step 3: non-finite loss; the step was dropped on every rank (1 dropped so far)" in res.stdout
        results = json.loads((tmp_path / "runs" / name / "results.json").read_text())
        assert results["steps"] == 12 and results["nonfinite_skipped"] == 1 and results["optimizer_updates"] == 11
        adapters[name] = comparable_adapter(run_adapter(tmp_path / "runs" / name))
    assert max((adapters["zero3"][k] - adapters["ddp"][k]).abs().max().item() for k in adapters["ddp"]) <= 1e-4


@pytest.mark.integration
def test_nan_loss_with_stop_ends_every_rank_with_one_line_and_keeps_the_finite_checkpoint(tiny_shards, tmp_path):
    cfg = write_config(tmp_path / "stop.yaml", tiny_shards, tmp_path / "runs",
                       train={"nonfinite": "stop", "save_every_steps": 2})
    res = _torchrun(cfg, "stop", _faulty({"RLRR_FAULT_NAN_AT": "5", "RLRR_FAULT_RANK": "1"}, tmp_path))
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("train: error:")]
    assert errors == ["train: error: non-finite loss at step 5 (1 in a row, train.nonfinite = stop); the weights "
                      "were not updated and the last checkpoint holds the last finite state"], res.stderr[-3000:]
    assert "exitcode  : 3" in res.stderr
    saved = torch.load(tmp_path / "runs" / "stop" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["state"]["global_step"] == 4 and all(torch.isfinite(t).all() for t in saved["trainable"].values())


@pytest.mark.integration
def test_a_nan_gradient_after_a_finite_loss_is_dropped_on_the_device_and_booked(tiny_shards, tmp_path):
    """Rank 1's 5th loss is finite and its gradient NaN: the all-reduced gradient norm is NaN on both
    ranks, and the DDP engine drops the step on the device (fused AdamW's found_inf), so no rank waits
    for it; the loop books it at the next loss check. With train.nonfinite: stop, one process stops
    there with one line, and its last checkpoint is the finite one of step 4."""
    cfg = write_config(tmp_path / "grad.yaml", tiny_shards, tmp_path / "runs", train={"save_every_steps": 2})
    res = _torchrun(cfg, "skip", _faulty({"RLRR_FAULT_NAN_GRAD_AT": "5", "RLRR_FAULT_RANK": "1"}, tmp_path))
    assert res.returncode == 0 and (tmp_path / "fired").exists(), res.stderr[-3000:]
    assert "step 5: non-finite gradient norm; the step was dropped on every rank (1 dropped so far)" in res.stdout
    run = tmp_path / "runs" / "skip"
    results = json.loads((run / "results.json").read_text())
    assert results["nonfinite_skipped"] == 1 and results["steps"] == 12 and results["optimizer_updates"] == 11
    assert all(torch.isfinite(t).all() for t in run_adapter(run).values())

    env = {**os.environ, **_faulty({"RLRR_FAULT_NAN_GRAD_AT": "5"}, tmp_path), "RLRR_FAULT_ONCE": str(tmp_path / "f2")}
    res = subprocess.run(train_cmd("--config", cfg, "--set", "run_name=stop", "train.nonfinite=stop"),
                         capture_output=True, text=True, timeout=300, env=env)
    errors = [line for line in res.stderr.splitlines() if line.startswith("train: error:")]
    assert res.returncode == 3 and errors == [
        "train: error: non-finite gradient norm at step 5 (1 in a row, train.nonfinite = stop); the weights were "
        "not updated and the last checkpoint holds the last finite state"], res.stderr[-3000:]
    saved = torch.load(tmp_path / "runs" / "stop" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["state"]["global_step"] == 4 and all(torch.isfinite(t).all() for t in saved["trainable"].values())


@pytest.mark.integration
def test_a_preemption_signal_on_one_rank_stops_every_rank_at_the_same_step(tiny_shards, tmp_path):
    """SIGUSR1 reaches rank 1 alone, during its 5th training loss: both ranks agree on it in the small
    all-reduce that carries step 5's outcome, which the loop reads once step 6 is queued (rlrr.train.
    StepOutcome), and stop after step 6 with one checkpoint (rank 0 logs it: it stopped too)."""
    cfg = write_config(tmp_path / "p.yaml", tiny_shards, tmp_path / "runs")
    res = _torchrun(cfg, "p", _faulty({"RLRR_FAULT_SIGNAL_AT": "5", "RLRR_FAULT_RANK": "1"}, tmp_path))
    assert res.returncode == 0 and (tmp_path / "fired").exists(), res.stderr[-3000:]
    assert "stopped at step 6 (epoch 0: a preemption signal (SIGTERM/SIGUSR1) on some rank)" in res.stdout, res.stdout
    run = tmp_path / "runs" / "p"
    assert (run / "PREEMPTED").read_text() == "step 6\n" and not (run / "results.json").exists()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]["global_step"] == 6


@pytest.mark.integration
def test_one_rank_failing_ends_every_rank_quickly_and_its_error_shows_once(tiny_shards, tmp_path):
    cfg = write_config(tmp_path / "fail.yaml", tiny_shards, tmp_path / "runs")
    t0 = time.monotonic()
    res = _torchrun(cfg, "fail", _faulty({"RLRR_FAULT_RAISE_AT": "3", "RLRR_FAULT_RANK": "1"}, tmp_path))
    assert res.returncode != 0 and time.monotonic() - t0 < 60
    assert res.stderr.count("RuntimeError: injected failure (RLRR_FAULT_RAISE_AT)") == 1, res.stderr[-3000:]
    assert res.stderr.count("Traceback (most recent call last)") <= 2  # the failing rank's, and torchrun's summary
    assert "train: rank 0 stopped: another rank failed" in res.stderr


@pytest.mark.integration
def test_a_stalled_rank_is_caught_by_the_watchdog(tiny_shards, tmp_path):
    """SIGSTOP one worker: the other waits in a collective; the watchdog prints its stacks and exits,
    torchrun ends the job, all within a bounded time. Once the watchdog's rank is gone the stopped one
    is continued: torchrun would otherwise wait its fixed 30 s before it SIGKILLs a stopped process,
    which is torchrun's behaviour, not ours, and a third of this test's time."""
    cfg = write_config(tmp_path / "stall.yaml", tiny_shards, tmp_path / "runs",
                       train={"epochs": 400, "eval_every": 1000, "watchdog_s": 6})
    cmd = train_cmd("--config", cfg, nproc=2)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "epoch 2/400" in line:
                break
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGSTOP)
        t0 = time.monotonic()
        while _alive(int(workers[0])) and time.monotonic() - t0 < 90:
            time.sleep(0.2)
        os.kill(int(workers[1]), signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and time.monotonic() - t0 < 90
        assert "Timeout (0:00:06)!" in err and "most recent call first" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "stall.yaml")])


def _alive(pid: int) -> bool:
    """Running or stopped; False once it has exited (a zombie waiting for torchrun's reap included)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _copy_task(tiny_shards, tmp_path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(tiny_shards, dst)
    return dst


def _rewrite_member(shard: Path, suffix: str, change) -> str:
    """Rewrite the first member ending in ``suffix`` of a tar shard with ``change(bytes)``; returns its key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    target = next(m.name for m, _ in members if m.name.endswith(suffix))
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            data = change(data) if m.name == target else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return target.rsplit(".", 1)[0]


@pytest.mark.integration
@pytest.mark.parametrize("in_memory", [False, True])
def test_an_undecodable_training_image_is_skipped_and_counted(tiny_shards, tmp_path, in_memory):
    shards = _copy_task(tiny_shards, tmp_path)
    shard = sorted((shards / "train800").glob("*.tar"))[1]
    key = _rewrite_member(shard, ".jpg", lambda b: b"not an image" + b[:20])
    cfg = write_config(tmp_path / "bad.yaml", str(shards), tmp_path / "runs",
                       data={"verify": False, "in_memory": in_memory})
    res = subprocess.run(train_cmd("--config", cfg), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "bad" / "results.json").read_text())
    assert results["train_samples_skipped"] >= 1 and results["steps"] == 12
    assert f"skipped an unreadable training sample: {shard} key {key}" in res.stderr


@pytest.mark.integration
def test_a_truncated_training_shard_is_skipped_and_counted(tiny_shards, tmp_path):
    shards = _copy_task(tiny_shards, tmp_path)
    shard = sorted((shards / "train800").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:700])
    cfg = write_config(tmp_path / "trunc.yaml", str(shards), tmp_path / "runs",
                       data={"verify": False, "in_memory": False})
    res = subprocess.run(train_cmd("--config", cfg), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "trunc" / "results.json").read_text())["train_samples_skipped"] >= 1
    assert "skipped the rest of an unreadable training shard: " in res.stderr and str(shard) in res.stderr


@pytest.mark.parametrize("damage,expected", [
    ("truncate_test", "unreadable shard: "),
    ("label", "label 9 outside 0..3"),
])
def test_unreadable_evaluation_data_or_a_bad_label_is_one_line_naming_the_shard(tiny_shards, tmp_path, capsys,
                                                                                damage, expected):
    shards = _copy_task(tiny_shards, tmp_path)
    shard = sorted((shards / "test").glob("*.tar"))[1]
    if damage == "truncate_test":
        shard.write_bytes(shard.read_bytes()[:700])
    else:
        key = _rewrite_member(shard, ".cls", lambda b: b"9")
        expected = f"{shard}: sample {key}: {expected}"
    cfg = write_config(tmp_path / "evalbad.yaml", str(shards), tmp_path / "runs", data={"verify": False})
    assert cli(["--config", cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train: error: ") and expected in err[-1] and str(shard) in err[-1], err[-3:]


def test_a_damaged_shard_fails_the_sha256_check_before_training(tiny_shards, tmp_path, capsys):
    shards = _copy_task(tiny_shards, tmp_path)
    shard = sorted((shards / "test").glob("*.tar"))[0]
    _rewrite_member(shard, ".cls", lambda b: b"1")
    cfg = write_config(tmp_path / "sha.yaml", str(shards), tmp_path / "runs")
    assert cli(["--config", cfg]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{shard}: sha256" in err and "does not match the manifest" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def mid_epoch_references(tiny_shards, tmp_path_factory) -> dict:
    """in_memory -> (config, uninterrupted 2-process run of it): both runs in one launch."""
    tmp = tmp_path_factory.mktemp("mid-epoch")
    cfgs = {in_memory: write_config(tmp / f"k-{in_memory}.yaml", tiny_shards, tmp / "runs",
                                    data={"in_memory": in_memory}, train={"epochs": 4, "save_every_steps": 3})
            for in_memory in (False, True)}
    train_many({f"straight-{m}": ["--config", c, "--set", f"run_name=straight-{m}"] for m, c in cfgs.items()}, tmp)
    return {m: (c, tmp / "runs" / f"straight-{m}") for m, c in cfgs.items()}


@pytest.mark.integration
@pytest.mark.parametrize("in_memory", [False, True])
def test_a_rank_killed_mid_epoch_restarts_and_equals_an_uninterrupted_run(in_memory, mid_epoch_references):
    """SIGKILL from outside to one worker, mid-epoch, under torchrun --max-restarts=1."""
    cfg, straight = mid_epoch_references[in_memory]
    cmd = train_cmd("--config", cfg, "--set", f"run_name=killed-{in_memory}", nproc=2)
    cmd.insert(cmd.index("--standalone") + 1, "--max-restarts=1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "epoch 1/4" in line:  # the second epoch is under way
            break
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[-1]), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed" in out, out[-2000:]
    killed = straight.parent / f"killed-{in_memory}"
    assert_same_tensors(run_adapter(killed), run_adapter(straight))
    a, b = (json.loads((r / "results.json").read_text()) for r in (killed, straight))
    assert a["history"] == b["history"]


@pytest.mark.integration
def test_two_hundred_evaluations_with_streaming_loaders_and_workers_do_not_hang(tiny_shards, tmp_path):
    """The fork-while-threads-hold-locks hazard: every epoch and evaluation starts loader workers."""
    cfg = write_config(tmp_path / "stress.yaml", tiny_shards, tmp_path / "runs",  # val and test: 2 per epoch
                       data={"in_memory": False, "workers": 1}, model={"drop_path": 0.0},
                       train={"epochs": 100, "warmup_epochs": 1, "log_every": 50, "save_every_epochs": 50,
                              "watchdog_s": 60})
    res = _torchrun(cfg, "stress")
    assert res.returncode == 0, res.stderr[-3000:]
    history = json.loads((tmp_path / "runs" / "stress" / "results.json").read_text())["history"]
    assert len(history) == 100 and all("val_acc1" in r and "test_acc1" in r for r in history)  # 200 evaluations


@pytest.mark.integration
def test_a_damaged_deepspeed_tag_falls_back_to_the_previous_one(tiny_shards, tmp_path, uninterrupted):
    zero2 = {"engine": "deepspeed", "zero_stage": 2}
    cfg = write_config(tmp_path / "ds.yaml", tiny_shards, tmp_path / "runs", train={**zero2, "save_every_steps": 3})
    cmd_stop = ["--set", "run_name=damaged", "train.max_steps=7"]
    res = subprocess.run(train_cmd("--config", cfg, *cmd_stop, nproc=2), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / "runs" / "damaged" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step7"
    # step 6 was saved twice (a step save and the epoch end): a new tag, never the old one overwritten
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step6.1", "step7"]
    for f in (ckpt / "step7").glob("*optim_states.pt"):
        f.write_bytes(f.read_bytes()[:100])  # a crash (or a full disk) after the tag was marked complete
    res = subprocess.run(train_cmd("--config", cfg, "--set", "run_name=damaged", "--resume", "latest", nproc=2),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipped unreadable checkpoint(s) step7" in res.stdout and "at epoch 1 step 6 (step6.1)" in res.stdout
    assert_same_tensors(run_adapter(tmp_path / "runs" / "damaged"), run_adapter(uninterrupted(train=zero2)))
