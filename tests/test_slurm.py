"""launch/slurm/*.sbatch and sweep.sh on a real single-node SLURM (slurmctld + slurmd + munge).

The cluster starts once for this module and is shut down at the end (nothing left running).
`scontrol requeue` resuming from the checkpoint is tested on two nodes in test_slurm_multinode.py.
"""
import json
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import FAULTS_PATH, ROOT, write_config
from slurm_cluster import resumed_step, running_cluster, wait_for

# The scripts ask for GPUs and many CPUs (cluster defaults); this CPU node has 2 cores and none.
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=2"]
JOB_ENV = {"PYTHON": sys.executable, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}

# a real SLURM cluster of this module's own (started on free ports in its own folder)
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster()


@pytest.fixture
def shards(tiny_shards):
    return tiny_shards


def _sbatch_in_root(cluster, *args, env=None):
    """sbatch from the repository root (SLURM_SUBMIT_DIR is where the scripts find launch/train.py)."""
    res = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env={**cluster.env, **JOB_ENV, **(env or {})},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip().split(";")[0])


def test_torchrun_job_trains_and_logs_into_the_run_directory(cluster, shards, tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs")
    job = _sbatch_in_root(cluster, *CPU_NODE, f"--output={tmp_path}/slurm-%j.out", "launch/slurm/train.sbatch", cfg,
                          "--set", "train.lr=0.02")
    state = cluster.wait(job)
    batch_log = (tmp_path / f"slurm-{job}.out").read_text()
    run = tmp_path / "runs" / "tiny"
    assert state == "COMPLETED", batch_log + "".join(p.read_text() for p in (run / "logs").glob("*.log"))
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs"] == 2 and results["steps"] == 12
    assert (run / "config.yaml").read_text().count("lr: 0.02") == 1  # the --set override reached the run
    assert f"-> {run}" in batch_log and "restart 0" in batch_log
    rank_log = (run / "logs" / f"slurm-{job}-node0.log").read_text()
    assert "epoch 2/2" in rank_log
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 12 and len(events.Scalars("test/acc1")) == 2
    assert (run / "adapter.safetensors").exists() and (run / "merged.safetensors").exists()


def test_srun_one_task_per_process_uses_the_slurm_environment(cluster, shards, tmp_path):
    cfg = write_config(tmp_path / "native.yaml", shards, tmp_path / "runs")
    job = _sbatch_in_root(cluster, "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
                          f"--output={tmp_path}/slurm-%j.out", "launch/slurm/train_srun.sbatch", cfg)
    state = cluster.wait(job)
    run = tmp_path / "runs" / "native"
    logs = "".join(p.read_text() for p in (run / "logs").glob("*.log"))
    assert state == "COMPLETED", (tmp_path / f"slurm-{job}.out").read_text() + logs
    assert json.loads((run / "results.json").read_text())["world_size"] == 2
    assert {p.name for p in (run / "logs").glob("*.log")} == {f"slurm-{job}-rank0.log", f"slurm-{job}-rank1.log"}


def _long_config(tmp_path, shards, name):
    # long enough to be interrupted; a checkpoint every 5 optimizer steps
    return write_config(tmp_path / f"{name}.yaml", shards, tmp_path / "runs",
                        train={"epochs": 24, "eval_every": 1000, "save_every_steps": 5})


def test_usr1_before_the_time_limit_checkpoints_and_requeues(cluster, shards, tmp_path):
    """What --signal=USR1@120 does: the ranks save and stop, the script requeues, the job resumes."""
    cfg = _long_config(tmp_path, shards, "preempted")
    run = tmp_path / "runs" / "preempted"
    job = _sbatch_in_root(cluster, *CPU_NODE, f"--output={tmp_path}/slurm-%j.out", "launch/slurm/train.sbatch", cfg)
    wait_for(run / "checkpoints" / "last.pt")
    cluster.run("scancel", "--signal=USR1", str(job))  # to the job's steps, as SLURM's --signal does
    cluster.start_requeued_now(job)  # the script requeued it
    state = cluster.wait(job, timeout=600)
    batch_log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", batch_log + cluster.diagnose(job)
    assert "stopped early at step" in batch_log and f"requeueing job {job}" in batch_log and "restart 1" in batch_log
    stopped = int(batch_log.split("stopped early at step", 1)[1].split(";")[0])
    assert resumed_step(run) == stopped  # resumed exactly where the signal stopped it
    assert not (run / "PREEMPTED").exists()
    assert json.loads((run / "results.json").read_text())["steps"] == 24 * 6


def test_usr1_during_evaluation_checkpoints_requeues_and_resumes(cluster, shards, tmp_path):
    """The signal lands while the ranks evaluate (each evaluation batch made slow from outside): they
    stop together, save the trained epoch, the script requeues, and the resumed job evaluates it."""
    cfg = write_config(tmp_path / "evalsig.yaml", shards, tmp_path / "runs",
                       data={"eval_batch_size_per_rank": 1}, train={"epochs": 3})
    run, marker = tmp_path / "runs" / "evalsig", tmp_path / "evaluating"
    faults = {"PYTHONPATH": FAULTS_PATH, "RLRR_FAULT_SLOW_EVAL": str(marker),
              "RLRR_FAULT_ONCE": str(tmp_path / "fired")}
    job = _sbatch_in_root(cluster, *CPU_NODE, f"--output={tmp_path}/slurm-%j.out", "launch/slurm/train.sbatch", cfg,
                          env=faults)
    wait_for(marker)
    cluster.run("scancel", "--signal=USR1", str(job))
    cluster.start_requeued_now(job)
    state = cluster.wait(job, timeout=600)
    batch_log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", batch_log + cluster.diagnose(job)
    assert "stopped early at step 6;" in batch_log and f"requeueing job {job}" in batch_log  # the end of epoch 1
    assert resumed_step(run) == 6
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 18 and [r["epoch"] for r in results["history"]] == [0, 1, 2]
    assert all("test_acc1" in r for r in results["history"])  # epoch 0 was evaluated after the resume


def test_sweep_submits_one_array_task_per_config(cluster, shards, tmp_path):
    configs = [write_config(tmp_path / f"{task}.yaml", shards, tmp_path / "ignored") for task in ("cifar", "dtd")]
    out = tmp_path / "sweep"
    res = subprocess.run(["launch/slurm/sweep.sh", "--output-dir", str(out), "--sbatch", " ".join(CPU_NODE),
                          "--max-parallel", "1", *configs], cwd=ROOT, env={**cluster.env, **JOB_ENV},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.split("submitted array job ", 1)[1].split(":")[0])
    deadline = time.time() + 600
    while cluster.run("squeue", "-h", "-j", str(job), check=False).stdout.strip():
        assert time.time() < deadline, "sweep did not finish"
        time.sleep(1)
    for task in ("cifar", "dtd"):
        results = json.loads((out / task / "results.json").read_text())  # output_dir overridden per sweep
        assert results["world_size"] == 2
    assert (out / "sweep-configs.txt").read_text().split() == configs
    assert not (tmp_path / "ignored").exists()
    report = subprocess.run([sys.executable, "tools/report.py", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert report.returncode == 0 and "Missing: Caltech101" in report.stdout
    assert "On the 2 tasks present" in report.stdout


def test_sweep_dry_run_covers_the_suites_and_rejects_bad_input(tmp_path):
    def sweep(*args):
        return subprocess.run(["launch/slurm/sweep.sh", "--dry-run", "--output-dir", str(tmp_path / "s"), *args],
                              cwd=ROOT, capture_output=True, text=True)
    vtab = sweep()
    assert vtab.returncode == 0 and "--array=0-18" in vtab.stdout and "launch/slurm/train.sbatch" in vtab.stdout
    assert len((tmp_path / "s" / "sweep-configs.txt").read_text().split()) == 19
    fgvc = sweep("--suite", "fgvc", "--launcher", "train_srun.sbatch", "--", "--set", "train.precision=bf16")
    assert fgvc.returncode == 0 and "--array=0-4" in fgvc.stdout
    assert fgvc.stdout.rstrip().endswith("train.precision=bf16")
    bad = sweep("--suite", "imagenet")
    assert bad.returncode == 2 and "--suite must be vtab or fgvc, got 'imagenet'" in bad.stderr
    missing = sweep("configs/vtab/nope.yaml")
    assert missing.returncode == 2 and "config configs/vtab/nope.yaml does not exist" in missing.stderr


def test_the_protocol_as_chained_arrays_gives_the_local_table(cluster, local_protocol, tmp_path):
    """tools/protocol.py --scheduler slurm: the grid array, then a job that selects and submits the
    retraining array, then the report job; the table equals the one the local scheduler made (for one
    of its tasks: each task's runs are independent of the others')."""
    from helpers import protocol_argv
    out = tmp_path / "p"
    argv = protocol_argv(local_protocol["tasks"][:1], out, "--scheduler", "slurm", "--max-parallel", "2",
                         "--sbatch", "--gpus-per-node=0 --cpus-per-task=1")
    res = subprocess.run([sys.executable, "tools/protocol.py", *argv], cwd=ROOT, capture_output=True, text=True,
                         env={**cluster.env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("--array=0-3%2") == 1 and "--dependency=afterany:" in res.stdout
    wait_for(out / "protocol.json", timeout=900)
    report = json.loads((out / "protocol.json").read_text())
    local = local_protocol["report"]

    def table(r):
        return [(t["task"], t["point"], t["val_acc1"], t["test_acc1"], t["status"]) for t in r["tasks"]]
    assert table(report) == table(local)[:1] and table(report)[0][0] == "fmnist", (out / "protocol.md").read_text()
    assert report["groups"]["all"] == local["tasks"][0]["test_mean"] and report["cost"]["total"] > 0
    assert len(list((out / "retrain").glob("*/results.json"))) == 2
