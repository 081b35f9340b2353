"""The training loop: ``main(argv)`` = parse -> build -> train/evaluate per epoch -> write the run.

    torchrun --nproc_per_node=8 launch/train.py --config configs/vtab/kitti.yaml [--set train.lr=0.003 ...]

Run directory <output_dir>/<run_name>/: config.yaml, tensorboard/, checkpoints/last.pt,
adapter.safetensors, merged.safetensors, results.json.
"""
import argparse
import json
import logging
import math
import os
import resource
import signal
import sys
import time

import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from . import checkpoint
from .adapter import (RLRRConfig, apply_rlrr, count_trainable, merge_rlrr, save_adapter, store_frozen_weights_in,
                      trainable_parameters, use_fused_attention)
from .config import ConfigError, RunConfig, load_config, save_config
from .data.loader import Manifest, SplitLoader
from .data.transforms import Recipe, normalize
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed
from .engine import ENGINES
from .evaluate import evaluate
from .optim import build_scheduler
from .pretrained import load_pretrained

log = logging.getLogger("rlrr")


def initial_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """The run's model before training: the same on every rank and when rebuilt after training
    (merged.safetensors, tools/analyze_svd.py), because it is built under ``train.seed`` alone. This
    matters for whatever the pretrained file does not set (the head, the adapter; the whole
    backbone when there is no file); the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg, num_classes)


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    m = cfg.model
    model = timm.create_model(m.name, pretrained=False, num_classes=num_classes, img_size=m.img_size,
                              drop_path_rate=m.drop_path, **m.timm_kwargs)
    if m.pretrained:
        load_pretrained(model, m.pretrained)
    use_fused_attention(model, m.fused_attn)
    if m.drop_path_mode == "dropout":
        # the reference's "drop path" is element-wise dropout on the residual branches (same linear rates)
        for name, module in list(model.named_modules()):
            if isinstance(module, timm.layers.DropPath):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, nn.Dropout(module.drop_prob))
    if m.method == "rlrr":
        apply_rlrr(model, RLRRConfig(init=m.init, split_qkv=m.split_qkv))
    else:  # linear probe: the frozen backbone, a zero-initialised head
        model.requires_grad_(False)
        for p in model.get_classifier().parameters():
            nn.init.zeros_(p)
            p.requires_grad_(True)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)  # timm's checkpointing is non-reentrant: frozen inputs still give grads
    return model


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


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Fine-tune a timm ViT/Swin with RLRR.")
    ap.add_argument("--config", help="YAML run config (see configs/)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="override config keys, e.g. train.lr=0.003 (repeatable)")
    ap.add_argument("--resume", choices=["latest"], help="continue the run in <output_dir>/<run_name>")
    ap.add_argument("--print-run-dir", action="store_true",
                    help="print the run directory this config resolves to and exit (for batch scripts)")
    return ap.parse_args(argv)


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.print_run_dir:
        if not cfg.run_name:
            raise ConfigError("run_name is not set, so the run directory is only decided at start; set run_name")
        print(os.path.join(cfg.output_dir, cfg.run_name))
        return {}
    info = init_distributed(always=cfg.train.engine == "deepspeed")  # DeepSpeed wants a process group, even of 1
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format="%(asctime)s %(message)s",
                        stream=sys.stdout, force=True)
    run_dir = os.path.join(cfg.output_dir, broadcast_object(info, cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S")))
    t = cfg.train
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    marker = os.path.join(ckpt_dir, ENGINES[t.engine].MARKER)
    # restarted by torchrun --max-restarts or requeued by SLURM: continue from the last checkpoint, if any
    restarted = any(int(os.environ.get(v) or 0) > 0 for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    preempted_marker = os.path.join(run_dir, "PREEMPTED")  # tells the batch script to requeue
    # rank 0 decides (it creates the run directory below; other ranks must not race it)
    resume = broadcast_object(info, (args.resume == "latest" or restarted) and os.path.isfile(marker))
    existing = broadcast_object(info, os.path.exists(ckpt_dir))
    if args.resume == "latest" and not resume:
        raise ConfigError(f"--resume latest: no checkpoint at {marker}")
    if not resume and existing and not restarted:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume latest or choose another run_name")
    if t.precision == "fp16" and info.device.type != "cuda":
        raise ConfigError("train.precision = fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    micro = t.batch_size // (info.world * t.grad_accum)
    if micro * info.world * t.grad_accum != t.batch_size:
        raise ConfigError(f"train.batch_size = {t.batch_size} is not divisible by world size {info.world} "
                          f"x train.grad_accum {t.grad_accum}")

    torch.manual_seed(t.seed + info.rank)  # per-rank streams (dropout); the model is seeded alike on all ranks
    manifest = Manifest(cfg.data.shards)
    if cfg.data.num_classes is not None and cfg.data.num_classes != manifest.num_classes:
        raise ConfigError(f"data.num_classes = {cfg.data.num_classes} but {manifest.path} has {manifest.num_classes} classes")
    model = initial_model(cfg, manifest.num_classes)
    if t.frozen_dtype == "bf16":  # before the move: the GPU never holds the fp32 copy
        saved = store_frozen_weights_in(model, torch.bfloat16)
        log.info(f"frozen linear weights stored in bf16: {saved / 2**20:.0f} MB saved")
    model = model.to(info.device)
    n_trainable = count_trainable(model)

    def split_loader(name, train):
        n = manifest.split(name).num_samples
        in_memory = cfg.data.in_memory if cfg.data.in_memory is not None else n <= cfg.data.in_memory_max
        return SplitLoader(manifest, name, train=train, batch_size=micro if train else cfg.data.eval_batch_size,
                           recipe=Recipe(cfg.data.recipe, train, cfg.data.flip, cfg.model.img_size), rank=info.rank,
                           world=info.world, workers=cfg.data.workers, seed=t.seed, in_memory=in_memory)

    train_data = split_loader(cfg.data.train_split, True)
    evals = {"test": split_loader(cfg.data.test_split, False)}
    if cfg.data.val_split:
        evals["val"] = split_loader(cfg.data.val_split, False)
    steps_per_epoch = math.ceil(len(train_data) / t.grad_accum)
    total_steps = t.epochs * steps_per_epoch

    engine = ENGINES[t.engine](model, cfg, info, micro)
    scheduler = build_scheduler(engine.optimizer, total_steps, t.warmup_epochs * steps_per_epoch, t.warmup_lr, t.min_lr)

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "train_time": 0.0, "images": 0,
             "epoch_seen": 0, "epoch_loss_sum": 0.0}  # the last two: the current epoch's running loss
    if resume:
        try:
            saved = engine.load(ckpt_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if len(saved["rng"]) == info.world:
            checkpoint.set_rng_state(saved["rng"][info.rank])
        state = saved["state"]
        log.info(f"resumed {run_dir} at epoch {state['epoch']} step {state['global_step']}")

    writer = None
    if info.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.path.exists(preempted_marker):
            os.remove(preempted_marker)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=state["global_step"] if resume else None)
        writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=1) + "\n```", state["global_step"])
        log.info(f"run {run_dir}: {cfg.model.name} ({cfg.model.method}), {n_trainable:,} trainable parameters, "
                 f"world {info.world}, global batch {t.batch_size} ({micro} x {info.world} x {t.grad_accum}), "
                 f"{steps_per_epoch} steps/epoch")

    def save_checkpoint():
        rng = [checkpoint.rng_state()]
        if info.enabled:
            rng = [None] * info.world
            torch.distributed.all_gather_object(rng, checkpoint.rng_state())
        engine.save(ckpt_dir, {"rng": rng, "state": state, "config_hash": cfg.digest()})

    preempt = Preemption()
    stopped_early = False
    model.train()
    for epoch in range(state["epoch"], t.epochs):
        t0, seen = time.perf_counter(), 0
        batches = train_data.epoch(epoch)
        bar = tqdm(total=len(train_data), initial=state["step_in_epoch"] * t.grad_accum, desc=f"epoch {epoch}",
                   disable=not info.is_main, leave=False, dynamic_ncols=True)
        skip = state["step_in_epoch"] * t.grad_accum  # the epoch's batches are deterministic: replay position
        for i, (images, labels, _) in enumerate(batches):
            if i < skip:
                continue
            last_micro = (i + 1) % t.grad_accum == 0 or i + 1 == len(train_data)
            images = normalize(images.to(info.device, non_blocking=True), cfg.data.stats)
            loss = engine.backward(images, labels.to(info.device, non_blocking=True), last_micro)
            seen += len(labels)
            state["epoch_seen"] += len(labels)
            state["epoch_loss_sum"] += loss.item() * len(labels)
            bar.update(1)
            if not last_micro:
                continue
            scheduler.step_update(state["global_step"])
            grad_norm = engine.step()
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            if writer and state["global_step"] % t.log_every == 0:
                writer.add_scalar("train/loss", loss.item(), state["global_step"])
                writer.add_scalar("train/lr", engine.optimizer.param_groups[0]["lr"], state["global_step"])
                writer.add_scalar("train/grad_norm", grad_norm, state["global_step"])
                writer.add_scalar("train/img_per_s", seen * info.world / (time.perf_counter() - t0), state["global_step"])
            out_of_budget = t.max_steps and state["global_step"] >= t.max_steps
            preempted = preempt.any_rank(info)
            if preempted or out_of_budget:
                save_checkpoint()
                stopped_early = True
                if preempted and info.is_main:
                    checkpoint.write_text_atomic(preempted_marker, f"step {state['global_step']}\n")
                break
            if t.save_every_steps and state["global_step"] % t.save_every_steps == 0:
                save_checkpoint()
        bar.close()
        state["train_time"] += time.perf_counter() - t0
        state["images"] += seen * info.world
        if stopped_early:
            log.info(f"stopped at step {state['global_step']} (epoch {epoch}); resume with --resume latest")
            break
        record = {"epoch": epoch, "train_loss": state["epoch_loss_sum"] / max(1, state["epoch_seen"]),
                  "lr": engine.optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
            for name, loader in evals.items():
                metrics = evaluate(engine, loader, info, manifest.num_classes, cfg.data.stats)
                record.update({f"{name}_acc1": metrics["acc1"], f"{name}_acc5": metrics["acc5"],
                               f"{name}_loss": metrics["loss"]})
                if writer:
                    for k in ("acc1", "acc5", "loss"):
                        writer.add_scalar(f"{name}/{k}", metrics[k], state["global_step"])
        peak = _peak_memory_mb(info.device)
        if writer:
            writer.add_scalar("sys/peak_memory_mb", peak, state["global_step"])
            writer.flush()
        state["history"].append(record)
        state.update(epoch=epoch + 1, step_in_epoch=0, epoch_seen=0, epoch_loss_sum=0.0)
        log.info(f"epoch {epoch + 1}/{t.epochs} loss {record['train_loss']:.4f} lr {record['lr']:.2e}"
                 + "".join(f" {k} {record[k]:.2f}" for k in ("val_acc1", "test_acc1") if k in record)
                 + f" {seen * info.world / (time.perf_counter() - t0):.1f} img/s peak {peak:.0f} MB")
        if (epoch + 1) % t.save_every_epochs == 0 or epoch + 1 == t.epochs:
            save_checkpoint()

    results = None
    if not stopped_early:
        results = summarize(state, cfg, n_trainable, info)
        adapter = engine.trainable_fp32()  # all ranks: ZeRO-3 gathers the partitions
        if info.is_main:
            write_final(cfg, manifest.num_classes, adapter, run_dir, results)
    if writer:
        writer.close()
    barrier(info)
    return results or {"stopped_at_step": state["global_step"]}


def write_final(cfg: RunConfig, num_classes: int, adapter: dict, run_dir: str, results: dict) -> None:
    """adapter.safetensors, merged.safetensors (a plain timm model) and results.json, from the fp32
    adapter and a fresh CPU copy of the backbone (engine-independent: works for ZeRO-3 too)."""
    model = initial_model(cfg, num_classes)
    with torch.no_grad():
        for name, p in trainable_parameters(model):
            p.copy_(adapter[name])
    save_adapter(model, os.path.join(run_dir, "adapter.safetensors"))
    merged = merge_rlrr(model) if cfg.model.method == "rlrr" else model
    tensors = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    checkpoint.write_atomic(os.path.join(run_dir, "merged.safetensors"), lambda tmp: save_file(tensors, tmp))
    checkpoint.write_text_atomic(os.path.join(run_dir, "results.json"), json.dumps(results, indent=1))
    log.info("results: " + json.dumps({k: results[k] for k in (
        "test_acc1_final", "test_acc1_at_best_val", "test_acc1_best_over_epochs")}))
    log.info(f"tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")


def summarize(state: dict, cfg: RunConfig, n_trainable: int, info: DistInfo) -> dict:
    evaluated = [r for r in state["history"] if "test_acc1" in r]
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
        "epochs": state["epoch"], "steps": state["global_step"], "wall_time_s": round(state["train_time"], 1),
        "img_per_s": round(state["images"] / max(state["train_time"], 1e-9), 1),
        "trainable_params": n_trainable, "world_size": info.world, "config_hash": cfg.digest(),
        "model": cfg.model.name, "method": cfg.model.method, "history": state["history"],
    }
