"""launch/slurm/train.sbatch with --nodes=2 on a real two-node SLURM on this machine (two slurmd
daemons, each in its own UTS namespace with its own hostname and port; see slurm_cluster.py): one
torchrun agent per node meets the other at a c10d rendezvous on the first node, and a requeued job
resumes from its checkpoint across both nodes."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT, write_config
from slurm_cluster import resumed_step, running_cluster, wait_for

pytestmark = pytest.mark.integration  # a real SLURM cluster (its own, beside test_slurm.py's if need be)
JOB_ENV = {"PYTHON": sys.executable, "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster(2)


def test_a_two_node_job_trains_across_both_nodes_and_a_requeue_resumes(cluster, tiny_shards, tmp_path):
    cfg = write_config(tmp_path / "two.yaml", tiny_shards, tmp_path / "runs",
                       train={"epochs": 24, "eval_every": 1000, "save_every_steps": 5})
    run = tmp_path / "runs" / "two"
    res = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2",
                          f"--output={tmp_path}/slurm-%j.out", "launch/slurm/train.sbatch", cfg], cwd=ROOT,
                         env={**cluster.env, **JOB_ENV}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip().split(";")[0])
    wait_for(run / "checkpoints" / "last.pt")
    cluster.run("scontrol", "requeue", str(job))
    cluster.start_requeued_now(job)
    state = cluster.wait(job, timeout=600)
    batch_log = (tmp_path / f"slurm-{job}.out").read_text()
    logs = {p.name: p.read_text() for p in (run / "logs").glob("*.log")}
    assert state == "COMPLETED", batch_log + "".join(logs.values()) + cluster.diagnose(job)
    assert "on rlrr-node[1-2]" in batch_log and "restart 1" in batch_log
    # one torchrun agent per node, each with its own log; the rendezvous puts global rank 0 (the one
    # that logs epochs) on either node
    assert set(logs) == {f"slurm-{job}-node0.log", f"slurm-{job}-node1.log"}
    assert sum("epoch 24/24" in text for text in logs.values()) == 1
    assert resumed_step(run) >= 5
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 24 * 6 and results["epochs"] == 24
