"""Resumable training state: RNG streams, files written atomically next to the previous one (kept as
a fallback), loaded with weights_only=True."""
import os
import random

import numpy as np
import torch

from .atomic import fsync_path, write_atomic


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


def save(obj: dict, path: str, previous: str) -> None:
    """Write ``obj`` to ``path`` atomically; the file it replaces becomes ``previous`` (the fallback if
    the new one is ever unreadable). The new file is on disk before the old one moves."""
    def write(tmp):
        torch.save(obj, tmp)
        fsync_path(tmp)
        if os.path.exists(path):
            os.replace(path, previous)
    write_atomic(path, write)


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
