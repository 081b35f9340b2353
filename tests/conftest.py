"""Shared fixtures. Helpers importable by every test module live in tests/helpers.py."""
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rlrr.atomic import write_text_atomic  # torch-free: Triton's setting below still comes first
from rlrr.startup import long_lived_imports

# Triton's interpreter runs rlrr/layers/fused.py's kernels on CPU tensors (tests/test_fused.py). Triton reads this
# when it is imported, so it is set before anything imports it; CPU runs never launch a kernel otherwise
# (model.kernel auto picks torch's ops off CUDA).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (make test and make test-fast: one worker per core) every worker and the processes it
# starts use one thread for torch's operators: two workers of two threads each on two cores spend their time spinning.
# Inductor's C++ builds likewise run in the compiling process instead of a pool of two more (each importing torch).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def pytest_configure(config):
    """torch, torch._dynamo and timm (every test module needs them) load once per test process with the
    collector paused and are then frozen out of its collections, as launch/train.py does (rlrr.startup).
    Not in pytest-xdist's controller: it only hands tests to its workers, which would wait the 4 s."""
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with long_lived_imports():
        import timm  # noqa: F401
        import torch._dynamo  # noqa: F401


if os.environ.get("RLRR_CPU_LOG"):  # where the suite's CPU goes: tests/cpu_per_test.py
    from cpu_per_test import pytest_runtest_protocol, pytest_terminal_summary  # noqa: F401  (hooks)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> str:
    """The tiny 4-class task most training tests use: 24 train, 8 val, 13 test images in shards of 4."""
    from helpers import tiny_vtab_shards  # here, not above: helpers imports rlrr, which imports Triton
    return tiny_vtab_shards(tmp_path_factory.mktemp("tiny-task"), n_train=24, n_val=8, n_test=13, shard_size=4)


def _built_once(tmp_path_factory, worker_id: str, name: str, build) -> Any:
    """``build(folder)`` once per test run, its JSON-able result returned. Under pytest-xdist (make test:
    one worker per core) the first worker to ask builds it while holding a lock and the others read its
    JSON: a session fixture that two test files share is then built once, not once per worker."""
    if worker_id == "master":
        return json.loads(json.dumps(build(tmp_path_factory.mktemp(name))))
    shared = tmp_path_factory.getbasetemp().parent  # this run's base folder, above each worker's own
    done = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the worker dies)
        if not done.exists():
            write_text_atomic(str(done), json.dumps(build(tmp_path_factory.mktemp(name))))
        return json.loads(done.read_text())


def _two_runs(tmp: Path) -> dict:
    from helpers import entry_point, tiny_vtab_shards, write_config
    shards = tiny_vtab_shards(tmp, n_train=16, n_val=4, n_test=13, shard_size=4)
    for task, lr in (("dtd", 0.01), ("kitti", 0.03)):
        cfg = write_config(tmp / f"{task}.yaml", shards, tmp / "runs", train={"epochs": 2, "lr": lr})
        assert entry_point().main(["--config", cfg])["test_acc1_final"] is not None
    return {"runs": str(tmp / "runs"), "shards": shards, "tmp": str(tmp)}


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, worker_id) -> dict:
    """Two finished RLRR runs of one random backbone (same seed, no pre-trained file), trained by the
    real entry point and named after VTAB tasks (a sweep's layout, <output_dir>/<task>): dtd at lr 0.01,
    kitti at 0.03. 16 train, 4 val and 13 test images. For the inference tools and the report."""
    runs = _built_once(tmp_path_factory, worker_id, "two-runs", _two_runs)
    return {"runs": Path(runs["runs"]), "shards": runs["shards"], "tmp": Path(runs["tmp"])}


def _local_protocol(tmp: Path) -> dict:
    from helpers import FAULTS_PATH, ROOT, protocol_argv, protocol_tasks
    tasks, out = protocol_tasks(tmp), tmp / "p"
    command = [sys.executable, str(ROOT / "tools" / "protocol.py"), *protocol_argv(tasks, out)]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # as on the SLURM test node: the same numbers there
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=one_thread)
    deadline = time.time() + 300
    while len(list(out.glob("grid/*/results.json"))) < 3:
        assert first.poll() is None and time.time() < deadline, "the first call ended or stalled"
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    finished = [[str(p), p.stat().st_mtime_ns] for p in out.glob("grid/*/results.json")]
    env = {**one_thread, "PYTHONPATH": FAULTS_PATH, "RLRR_FAULT_RAISE_AT": "1", "RLRR_FAULT_ARGV": "digits-seed43"}
    res = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    second = {"code": res.returncode, "stderr": res.stderr, "report": json.loads((out / "protocol.json").read_text()),
              "md": (out / "protocol.md").read_text(), "log": (out / "retrain" / "digits-seed43.log").read_text()}
    third = subprocess.run(command, capture_output=True, text=True, timeout=900, env=one_thread)
    return {"tasks": tasks, "out": str(out), "finished_after_stop": finished, "second": second,
            "third_code": third.returncode, "report": json.loads((out / "protocol.json").read_text())}


@pytest.fixture(scope="session")
def local_protocol(tmp_path_factory, worker_id) -> dict:
    """tools/protocol.py on one machine (tests/test_protocol.py, and test_slurm.py compares its own
    with it), three calls: the first stopped by SIGTERM once three grid runs have finished; the second
    with one retraining run failing on every attempt (a fault injected from outside); the third
    completing it."""
    protocol = _built_once(tmp_path_factory, worker_id, "protocol", _local_protocol)
    return {**protocol, "out": Path(protocol["out"]),
            "finished_after_stop": {Path(p): t for p, t in protocol["finished_after_stop"]}}


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, worker_id, tiny_shards):
    """``uninterrupted(**sections)``: the folder of a 2-process torchrun run of tiny_shards with
    write_config's ``sections``, run to its end once per test run. The tests that stop, kill, damage
    or resume the same run (their own config adds only when to save, which changes no number) compare
    with it, so test files no longer train the same reference each."""
    def run(**sections) -> Path:
        key = hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:12]

        def build(tmp: Path) -> str:
            from helpers import train_cmd, write_config
            cfg = write_config(tmp / "run.yaml", tiny_shards, tmp / "runs", **sections)
            res = subprocess.run(train_cmd("--config", cfg, "--set", "run_name=straight", nproc=2),
                                 capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, f"uninterrupted {sections}: {res.stderr[-3000:]}"
            return str(tmp / "runs" / "straight")
        return Path(_built_once(tmp_path_factory, worker_id, f"uninterrupted-{key}", build))
    return run
