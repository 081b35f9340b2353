"""A run as the loop sees it: its state (saved in every checkpoint), why it stopped, the preemption
signal and the watchdog; its directory (config.yaml, TensorBoard); and its end (results.json, the
adapter and the merged model).

Run directory <output_dir>/<run_name>/: config.yaml, tensorboard/, checkpoints/, adapter.safetensors,
merged.safetensors, results.json (and PREEMPTED while a preempted run waits for its requeue).
"""
import enum
import faulthandler
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.utils.tensorboard import SummaryWriter

from .adapter import save_adapter, statistics_buffers, trainable_parameters
from .atomic import write_atomic, write_json_atomic
from .checkpoint import CheckpointStore
from .compile import CompilePlan
from .config import RunConfig, save_config
from .data.loader import SplitLoader
from .data.manifest import Manifest
from .distributed import DistInfo, barrier, gather_object, peak_memory_mb, sum_over_ranks
from .engine import Engine
from .inference import inference_card, write_card
from .model import build_model, merge_model
from .profiling import StepProfiler

log = logging.getLogger("rlrr")


@dataclass
class RunState:
    """Where a run is: saved in every checkpoint, restored on resume (the engine holds the tensors)."""
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the current epoch: a resumed run replays to here
    global_step: int = 0
    history: list = field(default_factory=list)  # one record per completed epoch
    train_time: float = 0.0
    images: int = 0
    epoch_seen: int = 0  # this rank's samples and loss sum in the current epoch (its mean train loss)
    epoch_loss_sum: float = 0.0
    nonfinite_skipped: int = 0  # optimizer steps dropped for a non-finite loss or gradient
    nonfinite_in_a_row: int = 0
    samples_skipped: int = 0  # this rank's unreadable training samples, skipped
    warmup_s: float = 0.0  # the first optimizer step(s) of each process start (compiling, recording CUDA graphs) ...
    warmup_images: int = 0  # ... and its images: both left out of img/s
    run_s: float = 0.0  # wall time of every process start (setup, training, evaluation), summed over restarts


class StopReason(enum.Enum):
    """Why a run left its loop early, with a checkpoint saved (``Run.stopped``)."""
    PREEMPTED = "a preemption signal (SIGTERM/SIGUSR1) on some rank"
    MAX_STEPS = "train.max_steps reached"


class _CurrentStdout(logging.StreamHandler):
    """Writes each record to sys.stdout as it is at that moment. A handler that kept the stream of the
    moment it was made would write to a closed file once a redirect made there (a notebook cell, a
    test's capture) has ended: logging then prints "--- Logging error ---" into whatever stderr is."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ and setStream assign it; the property decides
        pass


def log_to_stdout(rank: int) -> None:
    """The run's log lines on stdout: INFO on rank 0, warnings only elsewhere."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s",
                        handlers=[_CurrentStdout()], force=True)


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM preemption, torchrun shutdown) -> save a checkpoint and leave cleanly."""

    def __init__(self):
        self.requested = False  # on this rank
        self.on_some_rank = False  # agreed by every rank when a step was booked (rlrr.train.book_step)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def any_rank(self, info: DistInfo) -> bool:
        """Every rank gives the same answer at the same step: the ranks agree on each optimizer step's
        signals in the small all-reduce that carries its outcome, read when the step is booked (one step
        later where the engine decides on the device, rlrr.train.StepOutcome); one process: now."""
        return self.on_some_rank if info.enabled else self.requested


@dataclass
class Run:
    """A started run: everything the steps of the loop read."""
    cfg: RunConfig
    info: DistInfo
    dir: str
    preempt: Preemption
    manifest: Manifest
    model: nn.Module
    engine: Engine
    scheduler: object
    train_data: SplitLoader
    evals: dict  # "test" (and "val") -> SplitLoader
    micro: int  # per-rank batch of one backward
    steps_per_epoch: int
    n_trainable: int  # counted before the engine wraps the model (ZeRO-3 partitions parameters)
    compiled: CompilePlan
    store: CheckpointStore  # <dir>/checkpoints
    state: RunState = field(default_factory=RunState)
    warmup_steps: int = 1  # this process's first optimizer steps still to book apart from img/s (end_warmup)
    stopped: Optional[StopReason] = None  # set when the loop stops early
    writer: Optional[SummaryWriter] = None  # rank 0 only
    epoch_img_per_s: float = 0.0
    pending_step: Optional[object] = None  # the last optimizer step's outcome until booked (rlrr.train.book_step)
    profiler: Optional[StepProfiler] = None  # train.profile_steps (rlrr.profiling)
    clock: float = field(default_factory=time.perf_counter)  # the last tick (rlrr.run.tick)
    watchdog_armed: float = -math.inf  # when the watchdog was last (re-)armed (rlrr.run.watchdog)


def tick(run: "Run") -> None:
    """Add this process's time since the last tick to ``state.run_s`` (checkpoints and results.json carry it)."""
    now = time.perf_counter()
    run.state.run_s += now - run.clock
    run.clock = now



def open_run_dir(run: Run, resumed: bool) -> None:
    """Rank 0: the run directory, its resolved config.yaml and the TensorBoard writer."""
    if not run.info.is_main:
        return
    cfg, t, step = run.cfg, run.cfg.train, run.state.global_step
    os.makedirs(run.store.directory, exist_ok=True)
    if os.path.exists(preempted_marker(run)):
        os.remove(preempted_marker(run))
    save_config(cfg, os.path.join(run.dir, "config.yaml"))
    write_card(run.dir, inference_card(cfg, run.manifest.class_names, run.manifest.data.get("preprocessing", {}),
                                       sized=hasattr(run.engine.model, "patch_embed")))
    if t.engine == "deepspeed":  # what DeepSpeed was given: the JSON's knobs and the run's values
        write_json_atomic(os.path.join(run.dir, "deepspeed.json"), run.engine.config)
    run.writer = SummaryWriter(os.path.join(run.dir, "tensorboard"), purge_step=step if resumed else None)
    run.writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=1) + "\n```", step)
    log.info(f"run {run.dir}: {cfg.model.name} ({cfg.model.method}), {run.n_trainable:,} trainable "
             f"parameters, world {run.info.world}, global batch {t.batch_size} ({run.micro} x {run.info.world} x "
             f"{t.grad_accum}), {run.steps_per_epoch} steps/epoch; torch.compile "
             f"{('whole' if run.compiled.scope == 'model' else 'by blocks') if run.compiled.compile else 'off'}, "
             f"CUDA graphs {'on' if run.compiled.cuda_graphs else 'off'}")
    for note in run.compiled.notes:
        log.info(note)


def preempted_marker(run: Run) -> str:
    return os.path.join(run.dir, "PREEMPTED")  # tells the batch script to requeue


def watchdog(run: Run, off: bool = False) -> None:
    """(Re-)arm the watchdog: if no batch completes within train.watchdog_s, print every thread's
    Python stack and exit with code 1, so that torchrun or SLURM restarts the job (which resumes)
    instead of a hung rank holding the allocation. C-level: it fires while Python is stuck in a
    collective too. Armed from the first batch on; re-armed once a tenth of its time (at most a second)
    has passed, not at every batch: each arming starts a thread, 0.17 ms of host time a step."""
    limit = run.cfg.train.watchdog_s
    if off or not limit:
        faulthandler.cancel_dump_traceback_later()
        run.watchdog_armed = -math.inf
    elif time.monotonic() - run.watchdog_armed >= min(1.0, limit / 10):
        faulthandler.dump_traceback_later(limit, exit=True, file=sys.__stderr__)
        run.watchdog_armed = time.monotonic()


def summarize(run: Run) -> dict:
    st, cfg = run.state, run.cfg
    skipped, = sum_over_ranks(run.info, [st.samples_skipped])
    held = gather_object(run.info, run.engine.parameter_elements_held())  # ZeRO-3: about 1/world each
    peak_mb = gather_object(run.info, round(peak_memory_mb(run.info.device), 1))
    evaluated = [r for r in st.history if "test_acc1" in r]
    with_val = [r for r in evaluated if "val_acc1" in r]
    best_val = max(with_val, key=lambda r: r["val_acc1"]) if with_val else None  # first epoch wins a tie
    return {
        "test_acc1_final": evaluated[-1]["test_acc1"] if evaluated else None,
        "test_acc5_final": evaluated[-1]["test_acc5"] if evaluated else None,
        "test_acc1_at_best_val": best_val["test_acc1"] if best_val else None,
        "best_val_epoch": best_val["epoch"] if best_val else None,
        "val_acc1_best": best_val["val_acc1"] if best_val else None,
        "test_acc1_best_over_epochs": max(r["test_acc1"] for r in evaluated) if evaluated else None,
        "note": "test_acc1_best_over_epochs selects the epoch on the test set (the reference protocol); "
                "report test_acc1_final, or test_acc1_at_best_val when a validation split is used",
        "epochs": st.epoch, "steps": st.global_step, "optimizer_updates": run.engine.optimizer_updates(),
        "wall_time_s": round(st.train_time, 1),
        "img_per_s": round((st.images - st.warmup_images) / max(st.train_time - st.warmup_s, 1e-9), 1),
        "warmup_s": round(st.warmup_s, 1),  # first steps of each process start (compile included), profiled steps
        "run_s": round(st.run_s, 1), "device": run.info.device.type,  # cost: run_s x world_size device-seconds
        "compile": run.compiled.to_dict(),
        "profile": run.profiler.summary if run.profiler else None,  # train.profile_steps
        "nonfinite_skipped": st.nonfinite_skipped,
        "train_samples_skipped": int(skipped),
        "trainable_params": run.n_trainable, "parameter_elements_per_rank": held,
        "peak_memory_mb": max(peak_mb),  # the largest rank's (GPU: max_memory_allocated; CPU: peak RSS)
        "world_size": run.info.world, "config_hash": cfg.digest(),
        "model": cfg.model.name, "method": cfg.model.method, "history": st.history,
        "rlrr_starts": getattr(run.model, "rlrr_starts", None),  # RLRR: layers per start (model.rlrr.init auto)
    }


def write_final(run: Run, results: dict) -> None:
    """adapter.safetensors, merged.safetensors (a plain timm model) and results.json, from the fp32
    trained tensors and a fresh CPU copy of the initial model (engine-independent: ZeRO-3 too)."""
    trained = run.engine.trainable_fp32()  # all ranks: ZeRO-3 gathers the partitions
    if not run.info.is_main:
        return
    cfg = run.cfg
    model = build_model(cfg.model, run.manifest.num_classes, seed=cfg.train.seed)
    with torch.no_grad():
        for name, p in trainable_parameters(model):
            p.copy_(trained[name])
        statistics = statistics_buffers(run.engine.model)  # BatchNorm running statistics moved too
        for name, b in statistics_buffers(model).items():
            b.copy_(statistics[name])
    save_adapter(model, os.path.join(run.dir, "adapter.safetensors"))
    merged = merge_model(model)
    tensors = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    write_atomic(os.path.join(run.dir, "merged.safetensors"), lambda tmp: save_file(tensors, tmp))
    write_json_atomic(os.path.join(run.dir, "results.json"), results)
    log.info("results: " + json.dumps({k: results[k] for k in (
        "test_acc1_final", "test_acc1_at_best_val", "test_acc1_best_over_epochs")}))
    log.info(f"tensorboard --logdir {os.path.join(run.dir, 'tensorboard')}")


def close_run(run: Run) -> None:
    if run.writer:
        run.writer.close()
    barrier(run.info)
