"""The training loop. ``main(argv)`` reads as the table of contents of a run:

    torchrun --nproc_per_node=8 launch/train.py --config configs/vtab/kitti.yaml [--set train.lr=0.003 ...]

setup_run (process group, run directory, data, model, engine, resume) -> per epoch: train_one_epoch,
evaluate_all, end_epoch (log, checkpoint) -> summarize, write_final.

Run directory <output_dir>/<run_name>/: config.yaml, tensorboard/, checkpoints/, adapter.safetensors,
merged.safetensors, results.json (and PREEMPTED while a preempted run waits for its requeue).
"""
import argparse
import dataclasses
import difflib
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

import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from . import checkpoint
from .adapter import count_trainable, save_adapter, statistics_buffers, trainable_parameters
from .atomic import write_atomic, write_json_atomic, write_text_atomic
from .compile import CompilePlan, compile_plan, prepare_compile
from .config import ConfigError, RunConfig, load_config, save_config
from .data.loader import DataError, Manifest, ManifestError, SplitLoader
from .data.transforms import Recipe, normalize
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_object,
    init_distributed,
    peak_memory_mb,
    restart_attempt,
    world_from_env,
)
from .engine import ENGINES, Engine, batch_per_rank, deepspeed_config
from .evaluate import evaluate
from .inference import inference_card, write_card
from .model import build_model, merge_model, set_kernel, store_frozen_weights_in
from .optim import build_scheduler

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
    warmup_s: float = 0.0  # the first optimizer step of each process start (compiling, when compiled) ...
    warmup_images: int = 0  # ... and its images: both left out of img/s


class StopReason(enum.Enum):
    """Why a run left its loop early, with a checkpoint saved (``Run.stopped``)."""
    PREEMPTED = "a preemption signal (SIGTERM/SIGUSR1) on some rank"
    MAX_STEPS = "train.max_steps reached"


class RunStopped(RuntimeError):
    """The run stopped itself for a reason the user must see (one line), e.g. a non-finite loss."""


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM preemption, torchrun shutdown) -> save a checkpoint and leave cleanly."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def any_rank(self, info: DistInfo) -> bool:
        flag = torch.tensor([float(self.requested)], device=info.device)
        return bool(all_reduce_sum(info, flag).item())


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
    state: RunState = field(default_factory=RunState)
    warming_up: bool = True  # this process has not finished an optimizer step yet
    stopped: Optional[StopReason] = None  # set when the loop stops early
    writer: Optional[SummaryWriter] = None  # rank 0 only
    epoch_img_per_s: float = 0.0

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.dir, "checkpoints")


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Fine-tune a timm ViT/Swin with RLRR.")
    ap.add_argument("--config", help="YAML run config (see configs/)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="override config keys, e.g. train.lr=0.003 (repeatable)")
    ap.add_argument("--resume", choices=["latest"], help="continue the run in <output_dir>/<run_name>")
    ap.add_argument("--allow-config-change", action="store_true",
                    help="resume even though keys other than run length and logging changed since the checkpoint")
    ap.add_argument("--print-run-dir", action="store_true",
                    help="print the run directory this config resolves to and exit (for batch scripts)")
    return ap.parse_args(argv)


def cli(argv=None) -> int:
    """``main`` for a command line: a bad input (config, file, name) is one line on stderr, printed by
    rank 0 only, and exit code 2; a run that stopped itself (RunStopped) likewise, exit code 3;
    anything else is a bug and keeps its traceback."""
    try:
        main(argv)
    except (ConfigError, DataError, RunStopped) as e:
        if world_from_env().rank == 0:
            # a DataError raised in a loader process arrives wrapped in its traceback: its last line says it
            message = str(e).strip().splitlines()[-1].removeprefix(f"{DataError.__module__}.DataError: ")
            print(f"train: error: {message}", file=sys.stderr)
        return 3 if isinstance(e, RunStopped) else 2
    except RuntimeError as e:
        if not lost_a_peer(e):
            raise
        # another rank failed and its own error says why: one line here, not a second traceback
        print(f"train: rank {world_from_env().rank} stopped: another rank failed ({str(e).splitlines()[0][:200]})",
              file=sys.stderr)
        return 1
    return 0


def lost_a_peer(e: BaseException) -> bool:
    """A collective that failed because another process went away (gloo, NCCL, the c10d store)."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "NCCL communicator was aborted"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.print_run_dir:
        if not cfg.run_name:
            raise ConfigError("run_name is not set, so the run directory is only decided at start; set run_name")
        print(os.path.join(cfg.output_dir, cfg.run_name))
        return {}
    run = setup_run(cfg, args.resume, args.allow_config_change)
    try:
        for epoch in range(run.state.epoch, cfg.train.epochs):
            train_one_epoch(run, epoch)
            record = evaluate_all(run, epoch) if not run.stopped else None
            if run.stopped:  # with a checkpoint saved
                log.info(f"stopped at step {run.state.global_step} (epoch {epoch}: {run.stopped.value}); "
                         "resume with --resume latest")
                close_run(run)
                return {"stopped_at_step": run.state.global_step}
            end_epoch(run, record)
    finally:  # the final merge may take long on a large model, and nothing else waits on it
        watchdog(run, off=True)
    results = summarize(run)
    write_final(run, results)
    close_run(run)
    return results


# ---- setup ---------------------------------------------------------------------------------------

def setup_run(cfg: RunConfig, resume: Optional[str] = None, allow_config_change: bool = False) -> Run:
    """``resume``: "latest" to continue the run (a restart by torchrun or SLURM continues by itself)."""
    preempt = Preemption()  # first: a signal that arrives while the model loads is still honoured
    logging.basicConfig(level=logging.INFO if world_from_env().rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
    manifest = check_inputs(cfg)  # before any process group: a bad input fails every rank at once
    # DeepSpeed wants a process group, even of 1
    info = init_distributed(always=cfg.train.engine == "deepspeed", timeout_s=cfg.train.dist_timeout_s)
    run_dir, resuming = decide_run_dir(cfg, info, resume is not None)
    t = cfg.train
    micro = per_rank_batch(cfg, info)
    torch.manual_seed(t.seed + info.rank)  # per-rank streams (dropout); the model is seeded alike on all ranks
    model = build_model(cfg.model, manifest.num_classes, seed=t.seed)
    if t.frozen_dtype == "bf16":  # before the engine moves it: the GPU never holds the fp32 copy
        saved = store_frozen_weights_in(model, torch.bfloat16)
        log.info(f"frozen linear weights stored in bf16: {saved / 2**20:.0f} MB saved")
    train_data = split_loader(cfg, manifest, info, cfg.data.train_split, micro)
    evals = {"test": split_loader(cfg, manifest, info, cfg.data.test_split)}
    if cfg.data.val_split:
        evals["val"] = split_loader(cfg, manifest, info, cfg.data.val_split)
    steps_per_epoch = math.ceil(len(train_data) / t.grad_accum)
    n_trainable = count_trainable(model)
    compiled = compile_plan(cfg, info)
    prepare_compile(compiled, t.compile)
    check_kernels(model, cfg, info, compiled)
    engine = ENGINES[t.engine](model, cfg, info, compiled)
    scheduler = build_scheduler(engine.optimizer, t.epochs * steps_per_epoch, t.warmup_epochs * steps_per_epoch,
                                t.warmup_lr, t.min_lr)
    run = Run(cfg, info, run_dir, preempt, manifest, model, engine, scheduler, train_data, evals, micro,
              steps_per_epoch, n_trainable, compiled)
    if resuming:
        load_checkpoint(run, allow_config_change)
    open_run_dir(run, resuming)
    return run


def check_kernels(model: nn.Module, cfg: RunConfig, info: DistInfo, compiled: CompilePlan) -> None:
    """model.kernel auto on a GPU, eager: RLRR's Triton kernels, unless they cannot build here (one line,
    then torch's ops)."""
    if cfg.model.kernel != "auto" or info.device.type != "cuda" or compiled.compile or cfg.model.method != "rlrr":
        return
    from .layers import fused
    why = fused.unavailable(info.device)
    if why:
        set_kernel(model, "torch")
        log.warning(f"model.kernel = auto: RLRR's Triton kernels do not run here ({why}); using torch's ops")


def check_inputs(cfg: RunConfig) -> Manifest:
    """Every file and name the run reads, checked up front: one clear line instead of a traceback
    per rank minutes later. Returns the shard manifest."""
    m = cfg.model
    if not timm.is_model(m.name):
        close = difflib.get_close_matches(m.name, timm.list_models(), n=3, cutoff=0.6)
        raise ConfigError(f"model.name = {m.name!r}: not a timm model"
                          + (f"; did you mean {' or '.join(close)}?" if close else ""))
    for key, path in (("model.pretrained", m.pretrained), ("train.deepspeed_config", cfg.train.deepspeed_config)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{key} = {path!r}: file not found")
    if cfg.train.engine == "deepspeed":
        deepspeed_config(cfg.train, world_from_env().size)  # a JSON that contradicts the run config
    splits = [s for s in (cfg.data.train_split, cfg.data.test_split, cfg.data.val_split) if s]
    try:
        manifest = Manifest(cfg.data.shards)
        for split in splits:
            manifest.split(split)
        if cfg.data.verify is not False and world_from_env().local_rank == 0:  # once per node
            checked = manifest.verify(splits, max_bytes=None if cfg.data.verify else VERIFY_UP_TO_BYTES)
            if checked:
                log.info(f"verified the sha256 of {checked / 2**20:.0f} MB of shards")
    except ManifestError as e:
        raise ConfigError(f"data: {e}") from None
    if cfg.data.num_classes is not None and cfg.data.num_classes != manifest.num_classes:
        raise ConfigError(f"data.num_classes = {cfg.data.num_classes} but {manifest.path} has "
                          f"{manifest.num_classes} classes")
    return manifest


VERIFY_UP_TO_BYTES = 2 * 2**30  # data.verify: null checks the shards' sha256 when they add up to at most this


def decide_run_dir(cfg: RunConfig, info: DistInfo, resume_requested: bool) -> tuple[str, bool]:
    """(run directory, resume?). Rank 0 decides both: it creates the directory later, and the other
    ranks must not race it. A restart by torchrun --max-restarts or a SLURM requeue resumes by itself."""
    run_dir = os.path.join(cfg.output_dir, broadcast_object(info, cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S")))
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    saved = ENGINES[cfg.train.engine].checkpoints(ckpt_dir)
    restarted = restart_attempt() != "0.0"
    resume = broadcast_object(info, (resume_requested or restarted) and bool(saved))
    existing = broadcast_object(info, os.path.exists(ckpt_dir))
    if resume_requested and not resume:
        raise ConfigError(f"--resume latest: no {cfg.train.engine} checkpoint in {ckpt_dir}")
    if not resume and existing and not restarted:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume latest or choose another run_name")
    return run_dir, resume


def per_rank_batch(cfg: RunConfig, info: DistInfo) -> int:
    if cfg.train.precision == "fp16" and info.device.type != "cuda":
        raise ConfigError("train.precision = fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return batch_per_rank(cfg.train, info.world)


def split_loader(cfg: RunConfig, manifest: Manifest, info: DistInfo, split: str,
                 train_batch: Optional[int] = None) -> SplitLoader:
    """The training loader when ``train_batch`` is given (per-rank micro-batch), else an evaluation loader."""
    d, train = cfg.data, train_batch is not None
    in_memory = d.in_memory if d.in_memory is not None else manifest.split(split).num_samples <= d.in_memory_max
    return SplitLoader(manifest, split, train=train, batch_size=train_batch if train else d.eval_batch_size_per_rank,
                       recipe=Recipe(d.recipe, train, d.flip, cfg.model.img_size), rank=info.rank, world=info.world,
                       workers=d.workers, seed=cfg.train.seed, in_memory=in_memory,
                       # on a GPU the in-memory split lives there (VTAB-1k: 150 MB), off the step's critical path
                       device=info.device if info.device.type == "cuda" else None)


def open_run_dir(run: Run, resumed: bool) -> None:
    """Rank 0: the run directory, its resolved config.yaml and the TensorBoard writer."""
    if not run.info.is_main:
        return
    cfg, t, step = run.cfg, run.cfg.train, run.state.global_step
    os.makedirs(run.ckpt_dir, exist_ok=True)
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
             f"{'on' if run.compiled.compile else 'off'}, CUDA graphs {'on' if run.compiled.cuda_graphs else 'off'}")
    for note in run.compiled.notes:
        log.info(note)


def preempted_marker(run: Run) -> str:
    return os.path.join(run.dir, "PREEMPTED")  # tells the batch script to requeue


# ---- one epoch -----------------------------------------------------------------------------------

def train_one_epoch(run: Run, epoch: int) -> None:
    """The epoch's optimizer steps, from the saved position when resumed. A stop inside it (preemption
    or train.max_steps) saves a checkpoint and sets ``run.stopped``."""
    t, st = run.cfg.train, run.state
    t0, seen, window_finite = time.perf_counter(), 0, True
    timed_from, timed_seen = t0, 0  # img/s counts from the end of this process's first step
    skip = st.step_in_epoch * t.grad_accum  # the epoch's batches are deterministic: replay to the position
    with tqdm(total=len(run.train_data), initial=skip, desc=f"epoch {epoch}", disable=not run.info.is_main,
              leave=False, dynamic_ncols=True) as bar:  # closed (its line cleared) on an exception too
        for i, (images, labels, _) in enumerate(run.train_data.epoch(epoch)):
            watchdog(run)
            if i < skip:
                continue
            last_micro = (i + 1) % t.grad_accum == 0 or i + 1 == len(run.train_data)
            seen += len(labels)
            bar.update(1)
            if window_finite:  # once a micro-batch of the window is not finite, the window is dropped
                images = normalize(images.to(run.info.device, non_blocking=True), run.cfg.data.stats)
                loss, window_finite = run.engine.backward(images, labels.to(run.info.device, non_blocking=True),
                                                          last_micro, lambda x: finite_on_every_rank(run.info, x))
                if window_finite:
                    st.epoch_seen += len(labels)
                    st.epoch_loss_sum += loss.item() * len(labels)
            if not last_micro:
                continue
            grad_norm = optimizer_step(run, window_finite)
            window_finite = True
            if run.warming_up:
                timed_from, timed_seen = end_warmup(run, time.perf_counter() - t0, seen), seen
            log_step(run, loss.item(), grad_norm, _rate(run, seen - timed_seen, timed_from))
            if stop_requested(run):
                break
            if t.save_every_steps and st.global_step % t.save_every_steps == 0:
                save_checkpoint(run)
    elapsed = time.perf_counter() - t0
    st.train_time += elapsed
    st.images += seen * run.info.world
    run.epoch_img_per_s = _rate(run, seen - timed_seen, timed_from)


def _rate(run: Run, seen: int, since: float) -> float:
    """img/s over every rank of ``seen`` samples per rank since ``since`` (a perf_counter reading)."""
    return seen * run.info.world / max(time.perf_counter() - since, 1e-9)


def end_warmup(run: Run, seconds: float, seen: int) -> float:
    """Book this process's first optimizer step (a compiled run compiles its graphs there) apart from
    the img/s figures; returns when the timed part starts."""
    run.warming_up = False
    run.state.warmup_s += seconds
    run.state.warmup_images += seen * run.info.world
    log.info(f"first step: {seconds:.1f} s{' (compiling)' if run.compiled.compile else ''}; img/s counts from here")
    return time.perf_counter()


def finite_on_every_rank(info: DistInfo, loss: torch.Tensor) -> bool:
    bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=info.device)
    return all_reduce_sum(info, bad).item() == 0


def optimizer_step(run: Run, window_finite: bool) -> float:
    """One optimizer step at the end of an accumulation window, or none when the window's loss or
    gradient was not finite on some rank (train.nonfinite). Returns the gradient norm."""
    st = run.state
    run.scheduler.step_update(st.global_step)
    if window_finite:
        grad_norm, applied = run.engine.step()
    else:
        if not run.engine.discard():
            raise RunStopped(f"non-finite loss at step {st.global_step + 1} inside an accumulation window: "
                             "DeepSpeed ZeRO-2 cannot drop the gradients the window already accumulated; the "
                             "last checkpoint holds the last finite state (ZeRO-1/3 or grad_accum 1 drop the window)")
        grad_norm, applied = float("nan"), False
    st.global_step += 1  # a dropped step still uses up its batches: the replay position stays exact
    st.step_in_epoch += 1
    if applied:
        st.nonfinite_in_a_row = 0
        return grad_norm
    st.nonfinite_skipped += 1
    st.nonfinite_in_a_row += 1
    what = "loss" if not window_finite else "gradient norm"
    log.warning(f"step {st.global_step}: non-finite {what}; the step was dropped on every rank "
                f"({st.nonfinite_skipped} dropped so far)")
    if run.writer:
        run.writer.add_scalar("train/nonfinite_skipped", st.nonfinite_skipped, st.global_step)
    t = run.cfg.train
    if t.nonfinite == "stop" or st.nonfinite_in_a_row > t.nonfinite_max_in_a_row:
        raise RunStopped(f"non-finite {what} at step {st.global_step} ({st.nonfinite_in_a_row} in a row, "
                         f"train.nonfinite = {t.nonfinite}); the weights were not updated and the last "
                         "checkpoint holds the last finite state")
    return grad_norm


def log_step(run: Run, loss: float, grad_norm: float, img_per_s: float) -> None:
    step = run.state.global_step
    if run.writer and step % run.cfg.train.log_every == 0:
        run.writer.add_scalar("train/loss", loss, step)
        run.writer.add_scalar("train/lr", run.engine.optimizer.param_groups[0]["lr"], step)
        run.writer.add_scalar("train/grad_norm", grad_norm, step)
        run.writer.add_scalar("train/img_per_s", img_per_s, step)


def stop_requested(run: Run) -> bool:
    """A preemption signal on any rank, or train.max_steps reached: save a checkpoint and stop."""
    max_steps = run.cfg.train.max_steps
    preempted = run.preempt.any_rank(run.info)  # collective: every rank stops at the same step
    if preempted:
        stop_with_checkpoint(run, StopReason.PREEMPTED)
    elif max_steps and run.state.global_step >= max_steps:
        stop_with_checkpoint(run, StopReason.MAX_STEPS)
    return run.stopped is not None


def stop_with_checkpoint(run: Run, reason: StopReason) -> None:
    run.stopped = reason
    save_checkpoint(run)
    if reason is StopReason.PREEMPTED and run.info.is_main:
        write_text_atomic(preempted_marker(run), f"step {run.state.global_step}\n")


def watchdog(run: Run, off: bool = False) -> None:
    """(Re-)arm the watchdog: if no batch completes within train.watchdog_s, print every thread's
    Python stack and exit with code 1, so that torchrun or SLURM restarts the job (which resumes)
    instead of a hung rank holding the allocation. C-level: it fires while Python is stuck in a
    collective too. Armed from the first batch on."""
    if off or not run.cfg.train.watchdog_s:
        faulthandler.cancel_dump_traceback_later()
    else:
        faulthandler.dump_traceback_later(run.cfg.train.watchdog_s, exit=True, file=sys.__stderr__)


def evaluate_all(run: Run, epoch: int) -> Optional[dict]:
    """The epoch's record: mean train loss, lr, and every evaluation split when one is due. None if a
    preemption signal arrived during evaluation: the checkpoint then holds the trained epoch, and
    the resumed run evaluates it."""
    st, t = run.state, run.cfg.train
    record = {"epoch": epoch, "train_loss": st.epoch_loss_sum / max(1, st.epoch_seen),
              "lr": run.engine.optimizer.param_groups[0]["lr"]}
    if (epoch + 1) % t.eval_every and epoch + 1 != t.epochs:
        return record
    for name, loader in run.evals.items():
        metrics = evaluate(run.engine, loader, run.info, run.manifest.num_classes, run.cfg.data.stats,
                           interrupted=lambda: run.preempt.requested, heartbeat=lambda: watchdog(run))
        if metrics is None:
            stop_with_checkpoint(run, StopReason.PREEMPTED)
            return None
        for k in ("acc1", "acc5", "loss"):
            record[f"{name}_{k}"] = metrics[k]
            if run.writer:
                run.writer.add_scalar(f"{name}/{k}", metrics[k], st.global_step)
    return record


def end_epoch(run: Run, record: dict) -> None:
    """Log the epoch, move the state to the next one and checkpoint when due."""
    st, t = run.state, run.cfg.train
    peak = peak_memory_mb(run.info.device)
    if run.writer:
        run.writer.add_scalar("sys/peak_memory_mb", peak, st.global_step)
        run.writer.flush()
    st.history.append(record)
    skipped = run.train_data.take_skipped()
    if skipped:
        st.samples_skipped += skipped
        log.warning(f"epoch {record['epoch']}: {skipped} unreadable training sample(s) skipped on rank "
                    f"{run.info.rank} (their shards and keys are in the log above)")
    st.epoch, st.step_in_epoch, st.epoch_seen, st.epoch_loss_sum = record["epoch"] + 1, 0, 0, 0.0
    log.info(f"epoch {st.epoch}/{t.epochs} loss {record['train_loss']:.4f} lr {record['lr']:.2e}"
             + "".join(f" {k} {record[k]:.2f}" for k in ("val_acc1", "test_acc1") if k in record)
             + f" {run.epoch_img_per_s:.1f} img/s peak {peak:.0f} MB")
    if st.epoch % t.save_every_epochs == 0 or st.epoch == t.epochs:
        save_checkpoint(run)


# ---- checkpoints ---------------------------------------------------------------------------------

# keys a resumed run may change: how long it runs and how it logs and saves, not what it trains
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.eval_every", "train.save_every_epochs",
                     "train.save_every_steps", "train.log_every", "data.eval_batch_size_per_rank", "output_dir",
                     "run_name", "train.compile_cache")


def save_checkpoint(run: Run) -> None:
    """Save the resumable state; never one with non-finite weights (the previous one stays)."""
    if not run.engine.trainable_finite():
        raise RunStopped(f"non-finite trainable weights at step {run.state.global_step}; not saved, the last "
                         "checkpoint holds the last finite state")
    rng = [checkpoint.rng_state()]
    if run.info.enabled:
        rng = [None] * run.info.world
        torch.distributed.all_gather_object(rng, checkpoint.rng_state())
    run.engine.save(run.ckpt_dir, {"rng": rng, "state": dataclasses.asdict(run.state), "config": run.cfg.to_dict(),
                                   "config_hash": run.cfg.digest()})


def load_checkpoint(run: Run, allow_config_change: bool = False) -> None:
    """The newest checkpoint every rank can read (an unreadable newest one falls back to the one
    before it); the config must not have changed in anything that matters to training."""
    failures = []
    for name in run.engine.checkpoints(run.ckpt_dir):
        try:
            saved = run.engine.load(run.ckpt_dir, name)
        except Exception as e:  # a truncated, empty or half-written file: any reader error
            saved = None
            failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if all_reduce_sum(run.info, torch.tensor([float(saved is None)], device=run.info.device)).item() == 0:
            break
    else:
        raise ConfigError(f"{run.ckpt_dir}: no usable checkpoint ({'; '.join(failures) or 'none found'})")
    if failures:
        log.warning(f"resume: skipped unreadable checkpoint(s) {'; '.join(failures)}; using {name}")
    check_config_unchanged(saved.get("config"), run.cfg, allow_config_change)
    if len(saved["rng"]) == run.info.world:
        checkpoint.set_rng_state(saved["rng"][run.info.rank])
    run.state = RunState(**saved["state"])
    log.info(f"resumed {run.dir} at epoch {run.state.epoch} step {run.state.global_step} ({name})")


def check_config_unchanged(saved: Optional[dict], cfg: RunConfig, allow: bool) -> None:
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "timm_kwargs" else {prefix + k: v})
        return out
    if saved is None:
        return
    old, new = flat(saved), flat(cfg.to_dict())
    changed = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if changed and not allow:
        raise ConfigError(f"resume: the config changed since the checkpoint: {', '.join(changed)}; "
                          "pass --allow-config-change to resume anyway")
    if changed:
        log.warning(f"resume with a changed config: {', '.join(changed)}")


# ---- the end -------------------------------------------------------------------------------------

def summarize(run: Run) -> dict:
    st, cfg = run.state, run.cfg
    skipped = all_reduce_sum(run.info, torch.tensor([st.samples_skipped], device=run.info.device)).item()
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
        "warmup_s": round(st.warmup_s, 1),  # first steps of each process start, compile included
        "compile": run.compiled.to_dict(),
        "nonfinite_skipped": st.nonfinite_skipped,
        "train_samples_skipped": int(skipped),
        "trainable_params": run.n_trainable, "parameter_elements_per_rank": held,
        "peak_memory_mb": max(peak_mb),  # the largest rank's (GPU: max_memory_allocated; CPU: peak RSS)
        "world_size": run.info.world, "config_hash": cfg.digest(),
        "model": cfg.model.name, "method": cfg.model.method, "history": st.history,
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
