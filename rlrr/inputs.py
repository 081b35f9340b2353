"""What a run reads, checked before anything starts (one clear line instead of a traceback per rank
minutes later), and the loaders and per-rank batch it reads with."""
import difflib
import logging
import os
from typing import Optional

import timm
import torch.nn as nn

from .compile import CompilePlan
from .config import ConfigError, RunConfig
from .data.loader import SplitLoader
from .data.manifest import Manifest, open_manifest
from .data.transforms import Recipe
from .distributed import DistInfo
from .engine import batch_per_rank, deepspeed_config
from .errors import ManifestError
from .model import set_kernel
from .world import world_from_env

log = logging.getLogger("rlrr")


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
        manifest = open_manifest(cfg.data)
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
                       device=info.device if info.device.type == "cuda" else None,
                       decode_device=info.device if d.decode == "device" else None)


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


