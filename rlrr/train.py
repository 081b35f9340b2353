"""The training loop. ``train(cfg)`` reads as the table of contents of a run (launch/train.py is its
command line):

    torchrun --nproc_per_node=8 launch/train.py --config configs/vtab/kitti.yaml [--set train.lr=0.003 ...]

setup_run (process group, run directory, data, model, engine, resume) -> per epoch: train_one_epoch,
evaluate_all, end_epoch (log, checkpoint) -> summarize, write_final (rlrr.run).
"""
import dataclasses
import logging
import math
import os
import time
from typing import Optional

import torch
from tqdm import tqdm

from . import checkpoint
from .adapter import count_trainable
from .atomic import write_text_atomic
from .compile import compile_plan, prepare_compile
from .config import RunConfig
from .data.transforms import normalize
from .distributed import all_reduce_sum, init_distributed, peak_memory_mb, sum_over_ranks
from .engine import ENGINES
from .errors import RunStopped
from .evaluate import evaluate
from .inputs import check_inputs, check_kernels, per_rank_batch, split_loader
from .model import build_model, store_frozen_weights_as_configured
from .optim import build_scheduler
from .profiling import StepProfiler
from .run import (
    Preemption,
    Run,
    RunState,
    StopReason,
    close_run,
    log_to_stdout,
    open_run_dir,
    preempted_marker,
    summarize,
    tick,
    watchdog,
    write_final,
)
from .world import world_from_env

log = logging.getLogger("rlrr")


def train(cfg: RunConfig, resume: Optional[str] = None, allow_config_change: bool = False) -> dict:
    """Train ``cfg`` to the end (or to a stop: preemption, train.max_steps) and return results.json's
    content. ``resume``: "latest" or "auto" (rlrr.checkpoint.decide_run_dir; a restart by torchrun or SLURM
    continues by itself)."""
    started = time.perf_counter()
    run = setup_run(cfg, resume, allow_config_change)
    run.clock = started  # the run's cost counts its setup too
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
        for loader in (run.train_data, *run.evals.values()):  # also after an error (SplitLoader.close)
            loader.close()
    tick(run)
    results = summarize(run)
    write_final(run, results)
    close_run(run)
    return results


# ---- setup ---------------------------------------------------------------------------------------

def setup_run(cfg: RunConfig, resume: Optional[str] = None, allow_config_change: bool = False) -> Run:
    preempt = Preemption()  # first: a signal that arrives while the model loads is still honoured
    log_to_stdout(world_from_env().rank)
    manifest = check_inputs(cfg)  # before any process group: a bad input fails every rank at once
    # DeepSpeed wants a process group, even of 1
    info = init_distributed(always=cfg.train.engine == "deepspeed", timeout_s=cfg.train.dist_timeout_s)
    run_dir, resuming = checkpoint.decide_run_dir(cfg, info, resume)
    t = cfg.train
    micro = per_rank_batch(cfg, info)
    torch.manual_seed(t.seed + info.rank)  # per-rank streams (dropout); the model is seeded alike on all ranks
    model = build_model(cfg.model, manifest.num_classes, seed=t.seed)
    saved = store_frozen_weights_as_configured(model, t)  # before the engine moves it: the GPU never holds fp32
    if saved:  # none under fp32 storage, or full fine-tuning
        log.info(f"frozen linear weights stored in bf16: {saved / 2**20:,.1f} MB saved")
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
              steps_per_epoch, n_trainable, compiled, checkpoint.store_for(cfg, run_dir),
              warmup_steps=compiled.warmup_steps,
              profiler=StepProfiler(t.profile_steps, os.path.join(run_dir, "profile"), info.device, info.is_main))
    if resuming:
        run.state = RunState(**checkpoint.load(engine, run.store, info, cfg, allow_config_change))
    open_run_dir(run, resuming)
    return run


# ---- one epoch -----------------------------------------------------------------------------------

def train_one_epoch(run: Run, epoch: int) -> None:
    """The epoch's optimizer steps, from the saved position when resumed. A stop inside it (preemption
    or train.max_steps) saves a checkpoint and sets ``run.stopped``."""
    t, st = run.cfg.train, run.state
    t0, seen, window_finite = time.perf_counter(), 0, True
    timed_from, timed_seen = t0, 0  # img/s counts from the end of this process's warm-up steps (end_warmup)
    loss_check = None if run.engine.decides_on_device else LossCheck(run)
    window = []  # this accumulation window's (loss on the device, batch size)
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
            if window_finite:  # host-checked (DeepSpeed): once a micro-batch is not finite, the window is dropped
                images = normalize(images.to(run.info.device, non_blocking=True), run.cfg.data.stats)
                loss, window_finite = run.engine.backward(images, labels.to(run.info.device, non_blocking=True),
                                                          last_micro, loss_check)
                window.append((loss, len(labels)))
            # the last step's outcome, read now that this micro-batch is queued: the host waits for that step
            # alone, and the GPU has this one to run meanwhile
            book_step(run)
            if not last_micro:
                continue
            optimizer_step(run, window, window_finite, loss_check)
            window, window_finite = [], True
            if run.warmup_steps:
                book_step(run)  # waits for the GPU to finish the step: all of it is warm-up
                timed_from, timed_seen = end_warmup(run, time.perf_counter() - timed_from, seen - timed_seen), seen
            elif profiled := run.profiler.after_step(seen):  # its window just closed: booked apart, as warm-up is
                timed_from, timed_seen = book_apart(run, *profiled), seen
            log_step(run, _rate(run, seen - timed_seen, timed_from))
            if stop_requested(run):
                break
            if t.save_every_steps and st.global_step % t.save_every_steps == 0:
                save_checkpoint(run)
    book_step(run)  # the epoch's last step, which the GPU has then finished
    if profiled := run.profiler.stop(seen):
        timed_from, timed_seen = book_apart(run, *profiled), seen
    elapsed = time.perf_counter() - t0
    st.train_time += elapsed
    st.images += seen * run.info.world
    run.epoch_img_per_s = _rate(run, seen - timed_seen, timed_from)


def _rate(run: Run, seen: int, since: float) -> float:
    """img/s over every rank of ``seen`` samples per rank since ``since`` (a perf_counter reading)."""
    return seen * run.info.world / max(time.perf_counter() - since, 1e-9)


def end_warmup(run: Run, seconds: float, seen: int) -> float:
    """Book one of this process's first optimizer steps apart from the img/s figures: the first (a
    compiled run compiles its graphs there) and, with CUDA graphs, the second (where they are recorded;
    the first runs them eagerly). Returns when the next timed part starts."""
    first = run.warmup_steps == run.compiled.warmup_steps
    run.warmup_steps -= 1
    book_apart(run, seconds, seen)
    what = f"first step: {seconds:.1f} s{' (compiling)' if run.compiled.compile else ''}" if first else \
        f"second step: {seconds:.1f} s (recording CUDA graphs)"
    log.info(what + ("; img/s counts from here" if not run.warmup_steps else ""))
    return time.perf_counter()


def book_apart(run: Run, seconds: float, seen: int) -> float:
    """Leave ``seconds`` and ``seen`` samples per rank out of img/s (warm-up and profiled steps); returns
    when the next timed part starts."""
    run.state.warmup_s += seconds
    run.state.warmup_images += seen * run.info.world
    return time.perf_counter()


class LossCheck:
    """engine.backward's check between forward and backward, for an engine that decides on the host
    (DeepSpeed: ZeRO-2 cannot drop gradients once the backward ran): is the loss finite on every rank?
    The same collective carries each rank's preemption signal."""

    def __init__(self, run: Run):
        self.run, self.bad_ranks = run, 0

    def __call__(self, loss: torch.Tensor) -> bool:
        preempt = self.run.preempt
        # the ranks whose loss is not finite, and those a preemption signal reached (Preemption.any_rank)
        bad, preempted = sum_over_ranks(self.run.info, [not math.isfinite(loss.item()), preempt.requested])
        preempt.on_some_rank = preempt.on_some_rank or preempted > 0
        self.bad_ranks = max(self.bad_ranks, bad)
        return bad == 0


class StepOutcome:
    """An optimizer step's outcome until book_step reads it: its micro-batches' losses, the gradient norm,
    whether it was applied, and how many ranks saw a non-finite loss or a preemption signal. Packed into
    one tensor on the device and copied to the host behind the step's work (non-blocking, with an event),
    so reading it waits for this step alone and not for what the loop has queued since."""

    def __init__(self, run: Run, window: list, grad_norm, applied, loss_check: Optional[LossCheck]):
        self.step, self.sizes = run.state.global_step, [n for _, n in window]
        device = run.info.device
        losses = torch.stack([loss.float() for loss, _ in window]).to(device)
        if loss_check is None:  # the engine decided on the device: the ranks agree here, in one small all-reduce
            flags = torch.stack([(~torch.isfinite(losses)).any().float(),
                                 torch.full((), float(run.preempt.requested), device=device)])
            all_reduce_sum(run.info, flags)
        else:  # agreed at each micro-batch's loss check
            flags = torch.tensor([float(loss_check.bad_ranks), float(run.preempt.on_some_rank)], device=device)
            loss_check.bad_ranks = 0
        outcome = [torch.as_tensor(v, dtype=torch.float32, device=device).reshape(1) for v in (grad_norm, applied)]
        self.values = torch.cat([losses, *outcome, flags]).to("cpu", non_blocking=True)
        self.ready = torch.cuda.Event() if device.type == "cuda" else None
        if self.ready is not None:
            self.ready.record()

    def read(self) -> list[float]:
        """[loss of each micro-batch..., gradient norm, applied, ranks with a non-finite loss, ranks preempted]."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


def optimizer_step(run: Run, window: list, window_finite: bool, loss_check: Optional[LossCheck]) -> None:
    """One optimizer step at the end of an accumulation window, or none when the loss check found a
    non-finite loss on some rank. Its outcome is booked later (book_step), where the host waits anyway."""
    st = run.state
    run.scheduler.step_update(st.global_step)
    if window_finite:
        grad_norm, applied = run.engine.step()
    else:
        if not run.engine.discard():
            raise RunStopped(f"non-finite loss at step {st.global_step + 1} inside an accumulation window: "
                             "DeepSpeed ZeRO-2 cannot drop the gradients the window already accumulated; the "
                             "last checkpoint holds the last finite state (ZeRO-1/3 or grad_accum 1 drop the window)")
        grad_norm, applied = math.nan, False
    st.global_step += 1  # a dropped step still uses up its batches: the replay position stays exact
    st.step_in_epoch += 1
    book_step(run)  # the last step's, if a resumed or first window left it (normally booked already)
    run.pending_step = StepOutcome(run, window, grad_norm, applied, loss_check)


def book_step(run: Run) -> None:
    """Book the last optimizer step's outcome, if not yet booked: the epoch's loss sums, the loss and
    gradient norm for TensorBoard, the ranks' preemption signals, and a dropped step (train.nonfinite:
    stop the run when asked)."""
    out, run.pending_step = run.pending_step, None
    if out is None:
        return
    st, t = run.state, run.cfg.train
    *losses, grad_norm, applied, bad_ranks, preempted = out.read()
    finite = [(loss, n) for loss, n in zip(losses, out.sizes) if math.isfinite(loss)]
    loss_sum, seen = sum(loss * n for loss, n in finite), sum(n for _, n in finite)
    st.epoch_seen += seen
    st.epoch_loss_sum += loss_sum
    run.preempt.on_some_rank = run.preempt.on_some_rank or preempted > 0
    if run.writer and out.step % t.log_every == 0:
        if seen:
            run.writer.add_scalar("train/loss", loss_sum / seen, out.step)
        run.writer.add_scalar("train/grad_norm", grad_norm, out.step)
    if applied:
        st.nonfinite_in_a_row = 0
        return
    st.nonfinite_skipped += 1
    st.nonfinite_in_a_row += 1
    what = "loss" if bad_ranks else "gradient norm"
    log.warning(f"step {out.step}: non-finite {what}; the step was dropped on every rank "
                f"({st.nonfinite_skipped} dropped so far)")
    if run.writer:
        run.writer.add_scalar("train/nonfinite_skipped", st.nonfinite_skipped, out.step)
    if t.nonfinite == "stop" or st.nonfinite_in_a_row > t.nonfinite_max_in_a_row:
        raise RunStopped(f"non-finite {what} at step {out.step} ({st.nonfinite_in_a_row} in a row, "
                         f"train.nonfinite = {t.nonfinite}); the weights were not updated and the last "
                         "checkpoint holds the last finite state")


def log_step(run: Run, img_per_s: float) -> None:
    step = run.state.global_step
    if run.writer and step % run.cfg.train.log_every == 0:  # the loss and gradient norm: book_step
        run.writer.add_scalar("train/lr", run.engine.optimizer.param_groups[0]["lr"], step)
        run.writer.add_scalar("train/img_per_s", img_per_s, step)


def stop_requested(run: Run) -> bool:
    """A preemption signal on any rank (agreed when a step was booked: every rank stops after the same
    step), or train.max_steps reached: save a checkpoint and stop."""
    max_steps = run.cfg.train.max_steps
    if run.preempt.any_rank(run.info):
        stop_with_checkpoint(run, StopReason.PREEMPTED)
    elif max_steps and run.state.global_step >= max_steps:
        stop_with_checkpoint(run, StopReason.MAX_STEPS)
    return run.stopped is not None


def stop_with_checkpoint(run: Run, reason: StopReason) -> None:
    run.stopped = reason
    save_checkpoint(run)
    if reason is StopReason.PREEMPTED and run.info.is_main:
        write_text_atomic(preempted_marker(run), f"step {run.state.global_step}\n")


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

def save_checkpoint(run: Run) -> None:
    """Save the resumable state; never one with non-finite weights (the previous one stays)."""
    book_step(run)  # the state counts the last step's outcome
    if not run.engine.trainable_finite():
        raise RunStopped(f"non-finite trainable weights at step {run.state.global_step}; not saved, the last "
                         "checkpoint holds the last finite state")
    tick(run)
    checkpoint.save(run.engine, run.store, run.info, run.cfg, dataclasses.asdict(run.state))
