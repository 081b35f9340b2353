"""The two ways to run a training step: DDP (plain torch) and DeepSpeed ZeRO 0-3.

Both implement ``Engine`` (below), the interface the loop in train.py, evaluation and checkpoints
use. Frozen weights are never written; where the files go is rlrr.checkpoint's CheckpointStore.
"""
import contextlib
import json
import math
import typing
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .adapter import statistics_buffers, trainable_parameters
from .checkpoint import CheckpointStore
from .compile import CompilePlan, compile_blocks_in_place
from .config import ConfigError, EngineName
from .distributed import DistInfo, barrier
from .optim import build_optimizer, param_groups

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


def optimizer_updates(optimizer) -> int:
    """How many updates the (innermost, torch) optimizer applied: Adam's own per-parameter step count,
    which checkpoints carry. Independent of the loop's counters, so a mismatch shows a miscount."""
    while getattr(optimizer, "optimizer", optimizer) is not optimizer:  # DeepSpeed's ZeRO wrappers
        optimizer = optimizer.optimizer
    steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
    return max(steps, default=0)


class Engine(typing.Protocol):
    """What the training loop, evaluation and checkpoints use of an engine (DDPEngine, DeepSpeedEngine)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer  # for the LR schedule (DeepSpeed: its wrapper)
    static_shapes: bool  # compiled: evaluation pads to one batch shape (no recompile for a short last batch)
    # True: a non-finite loss or gradient on any rank drops the step on the device, and backward never asks
    # loss_ok (the loop reads each step's outcome one step late); False: backward asks loss_ok on the host
    decides_on_device: bool

    def forward(self, images: torch.Tensor) -> torch.Tensor: ...  # fp32 logits (eval and training)
    def backward(self, images, labels, last_micro: bool, loss_ok=None) -> tuple[torch.Tensor, bool]: ...
    # (gradient norm, applied) at a window's end: floats, or 0-d tensors the loop reads where it waits anyway
    def step(self) -> tuple[typing.Union[float, torch.Tensor], typing.Union[bool, torch.Tensor]]: ...
    def discard(self) -> bool: ...  # drop the window's gradients; False where the engine cannot
    def trainable_fp32(self) -> dict: ...  # full fp32 adapter tensors, on every rank
    def trainable_finite(self) -> bool: ...
    def optimizer_updates(self) -> int: ...
    def parameter_elements_held(self) -> int: ...
    def save(self, store: CheckpointStore, client: dict) -> None: ...  # every rank calls it
    def load(self, store: CheckpointStore, name: str) -> dict: ...  # returns ``client``


def batch_per_rank(t, world: int) -> int:
    """The per-rank micro-batch of train.batch_size over ``world`` processes and train.grad_accum windows."""
    micro = t.batch_size // (world * t.grad_accum)
    if micro * world * t.grad_accum != t.batch_size:
        raise ConfigError(f"train.batch_size = {t.batch_size} is not divisible by world size {world} "
                          f"x train.grad_accum {t.grad_accum}")
    return micro


class DDPEngine:
    def __init__(self, model: nn.Module, cfg, info: DistInfo, compiled: Optional[CompilePlan] = None):
        t = cfg.train
        self.model, self.info, self.clip = model.to(info.device), info, t.clip_grad
        # listed once: walking the module tree for them cost 0.8 ms (ViT-B/16) to 1.1 ms (ViT-H/14) of host time a step
        self.trainable = [p for _, p in trainable_parameters(model)]
        self.optimizer = build_optimizer(model, t.lr, t.weight_decay)
        self.scaler = torch.amp.GradScaler(enabled=t.precision == "fp16")
        self.dtype = AMP_DTYPES.get(t.precision)
        by_blocks = bool(compiled) and compile_blocks_in_place(model, compiled)
        self.net = DistributedDataParallel(model, device_ids=[info.device] if info.device.type == "cuda" else None) \
            if info.enabled else model
        # compiled: evaluation pads to one batch shape, so a short last batch neither recompiles nor records a graph
        self.static_shapes = bool(compiled and (compiled.compile or compiled.cuda_graphs))
        self.cuda_graphs = bool(compiled and compiled.cuda_graphs)
        if compiled and compiled.compile and not by_blocks:  # around DDP: its optimizer splits the graph at buckets
            self.net = torch.compile(self.net, mode=compiled.mode)
        self.grad_accum = t.grad_accum

    def autocast(self):
        return torch.autocast(self.info.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def forward(self, images):
        if self.cuda_graphs:  # a new step of the CUDA-graph tree: the last step's outputs are not read again
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast():
            return self.net(images).float()

    decides_on_device = True

    def backward(self, images, labels, last_micro: bool, loss_ok=None) -> tuple[torch.Tensor, bool]:
        """(loss, True), with the backward queued and nothing read back: a non-finite loss (on any rank)
        makes every gradient NaN (the loss times NaN), so the all-reduced gradient norm is NaN on every
        rank and step() drops the window's update there. ``loss_ok`` is not asked (decides_on_device):
        a host check would wait for the forward every step, and the GPU would idle while the host then
        queues the backward, the optimizer step and the next batch (at ViT-B/16's batch 8 on an H200 the
        loop ran at 0.65x its step that way; docs/benchmarks.md)."""
        sync = contextlib.nullcontext() if last_micro or not self.info.enabled else self.net.no_sync()
        with sync:
            loss = nn.functional.cross_entropy(self.forward(images), labels)
            poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
            self.scaler.scale(loss * poison / self.grad_accum).backward()
        if self.cuda_graphs and not last_micro:
            self._own_grads()
        return loss.detach(), True

    def _own_grads(self) -> None:
        """Gradients into memory of their own between micro-batches. The first backward of a window hands its
        parameter gradients over as .grad without a copy, and under CUDA graphs that memory belongs to the
        graph's pool, which the next micro-batch's replay overwrites: the window would sum the wrong terms or
        stop (pytorch/pytorch#169545). Later backwards add into these copies in place."""
        for p in self.trainable:
            if p.grad is not None:
                p.grad = p.grad.clone()

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient norm, applied) as tensors on the device: a non-finite norm leaves the weights and
        AdamW's state as they are (the same on every rank: the gradients were all-reduced), decided on
        the device, so the host queues the next batch while the GPU still runs this step."""
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])
        if self.clip:  # without clipping, no pass over the gradients (a multiply by 1)
            torch.nn.utils.clip_grads_with_norm_(self.trainable, self.clip, norm)
        applied = torch.isfinite(norm)
        if self.scaler.is_enabled():  # fp16: the scaler skips on its own inf check and rescales
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.found_inf = (~applied).float()  # the fused AdamW skips the update on this flag
            self.optimizer.step()
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def discard(self) -> bool:
        """Drop the gradients accumulated in this window (a micro-batch of it was not finite); True:
        none of them is left."""
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def trainable_fp32(self) -> dict:
        return {n: p.detach().float().cpu() for n, p in trainable_parameters(self.model)}

    def trainable_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.trainable)  # in place, no copy

    def optimizer_updates(self) -> int:
        return optimizer_updates(self.optimizer)

    def parameter_elements_held(self) -> int:
        """Parameter elements (frozen ones included) this rank holds: all of them under DDP."""
        return sum(p.numel() for p in self.model.parameters())

    def save(self, store: CheckpointStore, client: dict) -> None:
        if self.info.is_main:
            store.write_file({"trainable": self.trainable_fp32(), "optimizer": self.optimizer.state_dict(),
                              "buffers": {n: b.cpu() for n, b in statistics_buffers(self.model).items()},
                              "scaler": self.scaler.state_dict(), **client})
        barrier(self.info)

    def load(self, store: CheckpointStore, name: str) -> dict:
        saved = store.read_file(name)
        params = dict(trainable_parameters(self.model))
        if sorted(saved["trainable"]) != sorted(params):
            raise ValueError(f"{store.path(name)}: its trainable tensors differ from this config's model")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved["trainable"][n])
            for n, b in statistics_buffers(self.model).items():
                b.copy_(saved["buffers"][n])
        state = saved["optimizer"]  # a checkpoint of the unfused AdamW (rlrr before it) resumes fused too
        self.optimizer.load_state_dict({**state, "param_groups": [{**g, "fused": True, "foreach": None}
                                                                  for g in state["param_groups"]]})
        self.scaler.load_state_dict(saved["scaler"])
        return saved


ZERO3_LIVE_DEFAULTS = {"stage3_max_live_parameters": 10_000_000, "stage3_max_reuse_distance": 10_000_000,
                       "stage3_prefetch_bucket_size": 5_000_000}  # elements; a DeepSpeed JSON may set others


def deepspeed_config(t, world: int) -> dict:
    """The DeepSpeed config of a run: train.deepspeed_config's JSON (tuning knobs: buckets, overlap,
    offload, ZeRO-3 thresholds) plus what the run config decides. A JSON may repeat a run-owned value
    or say "auto"; a different value is a ConfigError naming both, never silently overridden."""
    ds = {}
    if t.deepspeed_config:
        try:
            with open(t.deepspeed_config) as f:
                ds = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"train.deepspeed_config = {t.deepspeed_config!r}: not a readable JSON ({e})") from None
        if not isinstance(ds, dict):
            raise ConfigError(f"{t.deepspeed_config}: expected a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{t.deepspeed_config}: remove \"{section}\": rlrr builds AdamW over the trainable "
                              "parameters and its own schedule from train.lr, weight_decay, warmup_epochs, min_lr")
    micro = batch_per_rank(t, world)
    owned = {  # DeepSpeed key path: (run config key, value)
        ("train_batch_size",): ("train.batch_size", t.batch_size),
        ("train_micro_batch_size_per_gpu",): (f"train.batch_size / (world {world} x train.grad_accum)", micro),
        ("gradient_accumulation_steps",): ("train.grad_accum", t.grad_accum),
        ("gradient_clipping",): ("train.clip_grad", t.clip_grad or 0.0),
        ("bf16", "enabled"): ("train.precision", t.precision == "bf16"),
        ("fp16", "enabled"): ("train.precision", t.precision == "fp16"),
        ("zero_optimization", "stage"): ("train.zero_stage", t.zero_stage),
    }
    for path, (key, value) in owned.items():
        node = ds
        for part in path[:-1]:
            node = node.setdefault(part, {})
        given = node.get(path[-1], "auto")
        if given != "auto" and given != value:
            shown = t.precision if key == "train.precision" else value
            raise ConfigError(f"{t.deepspeed_config}: {'.'.join(path)} = {json.dumps(given)} conflicts with {key} = "
                              f"{shown}; make them agree or leave the key out of the JSON (the run config sets it)")
        node[path[-1]] = value
    if t.zero_stage == 3:
        # DeepSpeed keeps up to 1e9 gathered parameter elements live and re-uses them across forward and
        # backward: a whole ViT-H (632M) stays gathered on every rank, undoing the partitioning of the
        # frozen weights. Half a ViT-H block's worth keeps the per-rank memory near 1/world
        # (docs/benchmarks.md, "Scaling").
        for knob, value in ZERO3_LIVE_DEFAULTS.items():
            ds["zero_optimization"].setdefault(knob, value)
    ds["zero_allow_untested_optimizer"] = True  # torch's AdamW over the trainable parameters
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


class DeepSpeedEngine:
    """ZeRO stage 0-3 over the trainable parameters only (frozen ones are partitioned under stage 3
    and never reach the optimizer or the checkpoints). Checkpoints: sharded tags (rlrr.checkpoint)."""

    def __init__(self, model: nn.Module, cfg, info: DistInfo, compiled: Optional[CompilePlan] = None):
        import deepspeed  # imported here: plain DDP runs never pay for it
        t = cfg.train
        self.config = ds = deepspeed_config(t, info.world)
        self.info, self.dtype = info, AMP_DTYPES.get(t.precision)
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr)
        # the model arrives on the CPU: DeepSpeed moves it to the device, and under ZeRO-3 only each
        # rank's partition goes there (the device never holds the whole model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
        self.model = model
        self.stage = self.engine.zero_optimization_stage()
        self.backwards_in_window = 0
        self.decides_on_device = False  # a non-finite loss must stop the backward: ZeRO-2 cannot drop its gradients
        self.static_shapes = bool(compiled and compiled.compile)  # as DDPEngine's (no CUDA graphs here)
        # by blocks: in place, on the device DeepSpeed moved the module to; its hooks stay where they are
        if compiled and compiled.compile and not compile_blocks_in_place(self.engine.module, compiled):
            self.engine.compile()  # the whole model

    def forward(self, images):
        # bf16/fp16 engines hold the module in that dtype; inputs follow, logits come back in fp32
        return self.engine(images.to(self.dtype) if self.dtype else images).float()

    def backward(self, images, labels, last_micro: bool, loss_ok=None) -> tuple[torch.Tensor, bool]:
        # The loop calls step() once per accumulation window, and an epoch's last window may be short:
        # tell DeepSpeed where the window ends instead of letting it count micro-batches itself
        # (its count would put an update every grad_accum**2 micro-batches and drift at epoch ends).
        self.engine.set_gradient_accumulation_boundary(last_micro)
        loss = nn.functional.cross_entropy(self.forward(images), labels)
        if loss_ok is not None and not loss_ok(loss.detach()):
            return loss.detach(), False
        self.engine.backward(loss)
        self.backwards_in_window += 1
        return loss.detach(), True

    def step(self) -> tuple[float, bool]:
        """(gradient norm, applied). DeepSpeed's ZeRO-1/2 and bf16 optimizers skip a step whose
        gradient norm is not finite and report it as inf; the norm is None when DeepSpeed did not
        compute one."""
        self.engine.step()
        self.backwards_in_window = 0
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan"), True
        return float(norm), math.isfinite(float(norm))

    def discard(self) -> bool:
        # ZeRO 0, 1 and 3 drop what the window accumulated with zero_grad; ZeRO-2 keeps it in its own
        # partition buffers and would add it to the next window's update
        self.engine.optimizer.zero_grad()
        self.engine.zero_grad()
        left = self.stage == 2 and self.backwards_in_window > 0
        self.backwards_in_window = 0
        return not left

    def trainable_fp32(self) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param
        def full(p):
            master = safe_get_full_fp32_param(p)
            return p if master is None else master  # None: ZeRO-0 in fp32 keeps no separate master copy
        return {n: full(p).detach().float().cpu() for n, p in trainable_parameters(self.model)}

    def trainable_finite(self) -> bool:
        # the fp32 master copies (ZeRO-3: gathered, every rank takes part)
        return all(torch.isfinite(t).all() for t in self.trainable_fp32().values())

    def optimizer_updates(self) -> int:
        return optimizer_updates(self.engine.optimizer)

    def parameter_elements_held(self) -> int:
        # ZeRO-3 keeps each parameter's own partition in ds_tensor (the full one only while gathered)
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.model.parameters())

    def save(self, store: CheckpointStore, client: dict) -> None:
        tag = store.new_tag(client["state"]["global_step"], self.info)
        self.engine.save_checkpoint(store.directory, tag=tag, client_state=client, exclude_frozen_parameters=True,
                                    save_latest=False)
        barrier(self.info)  # every rank's shards are written
        if self.info.is_main:
            store.commit(tag)
        barrier(self.info)

    def load(self, store: CheckpointStore, tag: str) -> dict:
        path, client = self.engine.load_checkpoint(store.directory, tag=tag, load_module_strict=False)
        if path is None:
            raise ValueError(f"{store.path(tag)}: DeepSpeed found no checkpoint to load")
        return client


ENGINES = {"ddp": DDPEngine, "deepspeed": DeepSpeedEngine}
if set(ENGINES) != set(typing.get_args(EngineName)):
    raise ImportError(f"rlrr.engine.ENGINES {sorted(ENGINES)} and config.EngineName disagree")
