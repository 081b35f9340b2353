"""Resume and checkpoints: where a run's saved states are (one store for both engines' files), what
one holds (trainable tensors via the engine, RNG streams, the loop's state, the config), the
config-change check, and whether a start is a new run or a resume.

Files are written atomically, the two newest states are kept (an unreadable newest one falls back to
the one before it), and everything loads with weights_only=True.
"""
import logging
import os
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch

from .atomic import fsync_path, write_atomic, write_text_atomic
from .config import ConfigError, RunConfig, flat_dict, frozen_storage
from .distributed import DistInfo, broadcast_object, sum_over_ranks
from .world import restart_attempt

log = logging.getLogger("rlrr")

# keys a resumed run may change: how long it runs and how it logs and saves, not what it trains
# train.compile_scope: where the compiled graphs begin and end, not what they compute (a checkpoint from before its
# "auto" default says "blocks")
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.eval_every", "train.save_every_epochs",
                     "train.save_every_steps", "train.log_every", "data.eval_batch_size_per_rank", "output_dir",
                     "run_name", "train.compile_cache", "train.profile_steps", "train.compile_scope")


class CheckpointStore:
    """The checkpoints/ folder of a run. ``sharded`` (DeepSpeed): every rank writes its shards into a
    tag folder ``step<N>`` (``step<N>.<k>`` when a step is saved twice), marked COMPLETE only after
    all of them wrote; ``latest`` names only complete tags. Otherwise (DDP): rank 0 writes one file,
    ``last.pt``, and the one it replaces becomes ``prev.pt``. Either way the two newest are kept."""
    FILES = ("last.pt", "prev.pt")  # newest first
    COMPLETE = "COMPLETE"

    def __init__(self, directory: str, sharded: bool):
        self.directory, self.sharded = directory, sharded

    def saved(self) -> list[str]:
        """The saved states, newest first."""
        if not self.sharded:
            return [f for f in self.FILES if os.path.isfile(self.path(f))]
        return [t for t in self._tags() if os.path.isfile(os.path.join(self.directory, t, self.COMPLETE))]

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def write_file(self, obj: dict) -> None:
        """(Not sharded.) The new file is on disk before the old one moves to prev.pt."""
        last, previous = map(self.path, self.FILES)

        def write(tmp):
            torch.save(obj, tmp)
            fsync_path(tmp)
            if os.path.exists(last):
                os.replace(last, previous)
        write_atomic(last, write)

    def read_file(self, name: str) -> dict:
        return torch.load(self.path(name), map_location="cpu", weights_only=True)

    def new_tag(self, step: int, info: DistInfo) -> str:
        """(Sharded.) A tag never used before: a crash while rewriting one would leave neither version.
        Rank 0's listing decides."""
        tag, k = f"step{step}", 0
        while os.path.exists(self.path(tag if not k else f"{tag}.{k}")):
            k += 1
        return broadcast_object(info, tag if not k else f"{tag}.{k}")

    def commit(self, tag: str) -> None:
        """(Sharded, rank 0, after every rank wrote.) Mark ``tag`` complete and drop all but the two newest."""
        write_text_atomic(os.path.join(self.directory, tag, self.COMPLETE), "")
        write_text_atomic(self.path("latest"), tag)
        keep = set(self.saved()[:2])
        for old in self._tags():
            if old not in keep:
                shutil.rmtree(self.path(old))

    def _tags(self) -> list[str]:
        """Every tag folder, complete or not, newest first."""
        def order(tag):
            step, _, k = tag[len("step"):].partition(".")
            return int(step), int(k or 0)
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        tags = [t for t in names if re.fullmatch(r"step\d+(\.\d+)?", t) and os.path.isdir(self.path(t))]
        return sorted(tags, key=order, reverse=True)


def store_for(cfg: RunConfig, run_dir: str) -> CheckpointStore:
    return CheckpointStore(os.path.join(run_dir, "checkpoints"), sharded=cfg.train.engine == "deepspeed")


def decide_run_dir(cfg: RunConfig, info: DistInfo, resume: Optional[str] = None) -> tuple[str, bool]:
    """(run directory, resume?). Rank 0 decides both: it creates the directory later, and the other
    ranks must not race it. A restart by torchrun --max-restarts or a SLURM requeue resumes by itself.
    ``resume``: "latest" (a checkpoint must exist), "auto" (resume if one exists, else start, over an
    attempt that saved none if need be: sweeps and the protocol), or None (a new run)."""
    run_dir = os.path.join(cfg.output_dir, broadcast_object(info, cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S")))
    store = store_for(cfg, run_dir)
    restarted = restart_attempt() != "0.0"
    resuming = broadcast_object(info, (resume is not None or restarted) and bool(store.saved()))
    existing = broadcast_object(info, os.path.exists(store.directory))
    if resume == "latest" and not resuming:
        raise ConfigError(f"--resume latest: no {cfg.train.engine} checkpoint in {store.directory}")
    if not resuming and existing and not restarted and resume != "auto":
        raise ConfigError(f"{run_dir} already holds a run; pass --resume latest or choose another run_name")
    return run_dir, resuming


def save(engine, store: CheckpointStore, info: DistInfo, cfg: RunConfig, state: dict) -> None:
    """Save the resumable state (``state``: the loop's, as a dict) with every rank's RNG streams."""
    rng = [rng_state()]
    if info.enabled:
        rng = [None] * info.world
        torch.distributed.all_gather_object(rng, rng_state())
    engine.save(store, {"rng": rng, "state": state, "config": cfg.to_dict(), "config_hash": cfg.digest()})


def load(engine, store: CheckpointStore, info: DistInfo, cfg: RunConfig, allow_config_change: bool) -> dict:
    """The newest checkpoint every rank can read (an unreadable newest one falls back to the one
    before it); the config must not have changed in anything that matters to training. Restores the
    RNG streams; returns the loop's saved state."""
    failures = []
    for name in store.saved():
        try:
            saved = engine.load(store, name)
        except Exception as e:  # a truncated, empty or half-written file: any reader error
            saved = None
            failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if sum_over_ranks(info, [saved is None]) == [0]:  # every rank read this checkpoint
            break
    else:
        raise ConfigError(f"{store.directory}: no usable checkpoint ({'; '.join(failures) or 'none found'})")
    if failures:
        log.warning(f"resume: skipped unreadable checkpoint(s) {'; '.join(failures)}; using {name}")
    check_config_unchanged(saved.get("config"), cfg, allow_config_change)
    if len(saved["rng"]) == info.world:
        set_rng_state(saved["rng"][info.rank])
    log.info(f"resumed {os.path.dirname(store.directory)} at epoch {saved['state']['epoch']} step "
             f"{saved['state']['global_step']} ({name})")
    return saved["state"]


def check_config_unchanged(saved: Optional[dict], cfg: RunConfig, allow: bool) -> None:
    if saved is None:
        return
    old, new = (_as_trained(flat_dict(c)) for c in (saved, cfg.to_dict()))
    changed = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if changed and not allow:
        raise ConfigError(f"resume: the config changed since the checkpoint: {', '.join(changed)}; "
                          "pass --allow-config-change to resume anyway")
    if changed:
        log.warning(f"resume with a changed config: {', '.join(changed)}")


def _as_trained(flat: dict) -> dict:
    """``flat`` with train.frozen_dtype resolved to the storage it gives: "auto" and what it resolves to are one
    setting (a checkpoint from before that default says "fp32")."""
    if "train.frozen_dtype" not in flat:
        return flat
    stored = frozen_storage(flat["train.frozen_dtype"], flat.get("train.precision", "fp32"),
                            flat.get("train.engine", "ddp"))
    return {**flat, "train.frozen_dtype": stored}


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                       "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

