"""Many training runs on one machine: each a ``launch/train.py`` run under torchrun in its own run
directory, several at once, each in its own slot (on a GPU machine its own GPUs, on CPUs its share of
the cores). A finished run (results.json present) is reused and an interrupted one resumes from its
checkpoint, so a sweep can simply be started again. A run that fails is retried up to ``retries``
times, then reported with its own one-line error; it never stops the others. Used by tools/compare.py
and tools/protocol.py.
"""
import ctypes
import fcntl
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import yaml

from .atomic import write_text_atomic
from .config import ConfigError, apply_override, load_config
from .processes import run_limited


def repo_root() -> str:
    """The checkout that holds launch/train.py and configs/ (the package's parent in an editable
    install, else the working directory)."""
    for root in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd()):
        if os.path.isfile(os.path.join(root, "launch", "train.py")):
            return root
    raise ConfigError("launch/train.py not found: run from the rlrr checkout")


@dataclass
class Job:
    """One training run: ``bases`` (config files, later ones laid over earlier ones) plus ``overrides``
    (key=value), written to <out>/<label>.yaml, trained in <out>/<label>/."""
    label: str
    bases: list[str]
    overrides: list[str] = field(default_factory=list)
    out: str = "runs"
    nproc: int = 1

    @property
    def run_dir(self) -> str:
        return os.path.join(os.path.abspath(self.out), self.label)

    @property
    def config_path(self) -> str:
        return os.path.join(os.path.abspath(self.out), f"{self.label}.yaml")

    @property
    def log_path(self) -> str:
        return os.path.join(os.path.abspath(self.out), f"{self.label}.log")

    def results(self) -> Optional[dict]:
        path = os.path.join(self.run_dir, "results.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def compose(self) -> None:
        """Write the run's config file, the overrides in it (the file alone describes the run: a SLURM
        array task reads nothing else), and check it: a ConfigError here, before any process starts."""
        data = {"base": [os.path.abspath(b) for b in self.bases]}
        for text in self.overrides:
            apply_override(data, text)
        data.update(output_dir=os.path.abspath(self.out), run_name=self.label)
        write_text_atomic(self.config_path, yaml.safe_dump(data, sort_keys=False))
        load_config(self.config_path)

    def command(self) -> list[str]:
        """launch/train.py on the composed config (under torchrun for several processes); --resume auto
        continues an attempt that saved a checkpoint."""
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}"] \
            if self.nproc > 1 else []
        return [sys.executable, *launcher, os.path.join(repo_root(), "launch", "train.py"), "--config",
                self.config_path, "--resume", "auto"]


def run_job(job: Job, gpus: Optional[str] = None, threads: Optional[int] = None, timeout: Optional[float] = None,
            rerun: bool = False, retries: int = 0, tool: str = "sweep") -> dict:
    """Train ``job`` (or reuse its results); returns {status, attempts, launch_s, results}. ``status``:
    "reused", "ok", or "failed (...): <its error line>"."""
    row = {"label": job.label, "run_dir": job.run_dir, "overrides": job.overrides, "attempts": 0}
    finished = job.results()
    if finished is not None and not rerun:
        return {**row, "status": "reused", "results": finished}
    if rerun and os.path.isdir(job.run_dir):  # train again from the start, not resume the finished run
        shutil.rmtree(job.run_dir)
    try:
        job.compose()
    except ConfigError as e:
        return _failed(row, f"failed (config): {e}", tool)
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {}))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    while True:
        row["attempts"] += 1
        print(f"{tool}: {job.label}: {' '.join(shlex.quote(c) for c in job.command())}", flush=True)
        rc = _launch(job, env, timeout)
        if rc == 0 or row["attempts"] > retries:
            break
        print(f"{tool}: {job.label}: {_why(rc)} ({last_error(job.log_path)}); retrying", file=sys.stderr, flush=True)
    row["launch_s"] = round(time.time() - t0, 1)
    if rc != 0:
        return _failed(row, f"failed ({_why(rc)}): {last_error(job.log_path)}", tool)
    results = job.results()
    if results is None:
        return {**row, "status": "missing: no results.json"}
    return {**row, "status": "ok", "results": results}


def _launch(job: Job, env: dict, timeout: Optional[float]):
    """One attempt. The run holds a lock on <label>.lock for as long as it lives: a sweep started again
    while an orphaned attempt of an earlier one still runs waits for it to end, and never trains the
    same run twice at once. The attempt is told to stop (SIGTERM: it saves a checkpoint) if this
    process dies first, and stopped with its workers if it runs past ``timeout`` (rlrr.processes)."""
    with open(job.log_path, "a") as log, open(job.config_path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # appended: a retried run's log keeps the failed attempt
        # in this process's group: a terminal's Ctrl-C reaches every run of a parallel sweep, as before
        rc = run_limited(job.command(), timeout, own_group=False, cwd=repo_root(), stdout=log,
                         stderr=subprocess.STDOUT, env=env, pass_fds=(lock.fileno(),), preexec_fn=_stop_with_parent)
        return "timeout" if rc is None else rc


def _stop_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _why(rc) -> str:
    return "timed out" if rc == "timeout" else f"exit {rc}"


def _failed(row: dict, status: str, tool: str) -> dict:
    print(f"{tool}: {row['label']}: {status}", file=sys.stderr, flush=True)
    return {**row, "status": status}


def last_error(log_path: str) -> str:
    """The run's own one-line error if it printed one, else the log's last line."""
    if not os.path.isfile(log_path):
        return "no output"
    with open(log_path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    errors = [ln for ln in lines if re.match(r"\S+: error: ", ln)] or [ln for ln in lines if "error" in ln.lower()]
    return ((errors or lines or ["no output"])[-1])[:300]


def slots(parallel: int, nproc: int) -> list[tuple[Optional[str], Optional[int]]]:
    """(CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS) of each of ``parallel`` slots: on a GPU machine slot k
    owns GPUs k*nproc .. (k+1)*nproc - 1; on CPUs the slots share the cores out."""
    import torch
    gpus = torch.cuda.device_count()
    if gpus and gpus < parallel * nproc:
        raise ConfigError(f"--parallel {parallel} x {nproc} processes per run needs {parallel * nproc} GPUs, "
                          f"this machine has {gpus}")
    if gpus:
        return [(",".join(str(k * nproc + i) for i in range(nproc)), None) for k in range(parallel)]
    threads = None if parallel == 1 or "OMP_NUM_THREADS" in os.environ else \
        max(1, (os.cpu_count() or 1) // (parallel * nproc))
    return [(None, threads)] * parallel


def run_jobs(jobs: list[Job], parallel: int = 1, **kwargs) -> list[dict]:
    """Every job, in order, ``parallel`` at a time, each in a free slot; one row per job (run_job's)."""
    if parallel <= 1:
        return [run_job(j, **kwargs) for j in jobs]
    free = queue.Queue()
    for slot in slots(parallel, max(j.nproc for j in jobs)):
        free.put(slot)

    def one(job):
        gpus, threads = free.get()
        try:
            return run_job(job, gpus=gpus, threads=threads, **kwargs)
        finally:
            free.put((gpus, threads))
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, jobs))
