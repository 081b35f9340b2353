"""Pre-trained backbones from local files only (never the network).

Accepted: Google ``vision_transformer`` .npz (read by timm's own loader), timm .safetensors and
.pth/.pt/.bin, checkpoints that nest the weights under ``model``/``state_dict`` (microsoft Swin), and
state_dicts in another key layout with the same tensors in the same order (torchvision's MobileNetV2
for timm's ``mobilenetv2_100``).
timm's per-family ``checkpoint_filter_fn`` converts original key layouts and resamples position
embeddings / relative position tables to the model's size. The classifier is never loaded: RLRR
starts every task with a zero head.
"""
import importlib
import os

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from .config import ConfigError

STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_SHOW = 5  # mismatched keys named in an error


class CheckpointError(ConfigError):
    """A pre-trained file that is missing, of an unknown format, or does not fit the model (an input the
    user must fix, like any ConfigError)."""


def _first(keys, n=_SHOW) -> str:
    keys = list(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for key in ("model", "state_dict", "module"):  # microsoft Swin and trainer checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _renamed_by_order(sd: dict[str, torch.Tensor], model: nn.Module, is_head) -> dict[str, torch.Tensor]:
    """A state_dict in another library's key layout (torchvision's MobileNetV2 ``features.*`` for timm's
    ``mobilenetv2_100``) holding the same tensors in the same order as the model's: the model's names,
    given only if every shape lines up and the file ends with as many classifier tensors as the model's.
    Otherwise ``sd`` unchanged (the key check below names what does not fit)."""
    own = model.state_dict()
    if any(k in own for k in sd):
        return sd
    body = [k for k in own if not is_head(k)]
    head = [k for k in own if is_head(k)]
    theirs = list(sd.items())
    if len(theirs) != len(body) + len(head) or any(tuple(v.shape) != tuple(own[k].shape)
                                                  for k, (_, v) in zip(body, theirs)):
        return sd
    return dict(zip(body + head, (v for _, v in theirs)))


def _load_state_dict_file(model: nn.Module, path: str) -> None:
    sd = _read_state_dict(path)
    head = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    is_head = lambda k: k == head or k.startswith(head + ".")  # noqa: E731
    sd = _renamed_by_order(sd, model, is_head)
    family = importlib.import_module(type(model).__module__)
    if hasattr(family, "checkpoint_filter_fn"):
        try:
            sd = family.checkpoint_filter_fn(sd, model)
        except Exception as e:
            raise CheckpointError(f"{path}: timm could not convert it for {type(model).__name__} "
                                  f"({type(e).__name__}: {e})") from None
    sd = {k: v for k, v in sd.items() if not is_head(k)}
    own = {k: v for k, v in model.state_dict().items() if not is_head(k)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    problems = []
    if shapes:
        problems.append(f"shape mismatch: {_first(shapes)}")
    if missing:
        problems.append(f"missing: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected: {_first(unexpected)}")
    if problems:
        raise CheckpointError(f"{path} does not fit {model.pretrained_cfg.get('architecture', type(model).__name__)}: "
                              + "; ".join(problems))
    model.load_state_dict(sd, strict=False)  # only the head is absent, checked above


def _check_npz(model: VisionTransformer, path: str) -> None:
    """Name the first mismatches before timm's loader copies (its own errors name no key)."""
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({e})") from None
    with npz:
        prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in npz.files), None)
        if prefix is None:
            raise CheckpointError(f"{path}: not a Google vision_transformer checkpoint (no 'embedding/kernel')")
        kh, kw, cin, width = npz[f"{prefix}embedding/kernel"].shape
        depth = sum(1 for k in npz.files if k.startswith(f"{prefix}Transformer/encoderblock_")
                    and k.endswith("/LayerNorm_0/scale"))
        mlp = npz[f"{prefix}Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].shape[1] if depth else None
    expected = {"width": (width, model.embed_dim), "depth": (depth, len(model.blocks)),
                "mlp hidden": (mlp, model.blocks[0].mlp.fc1.out_features),
                "input channels": (cin, model.patch_embed.proj.in_channels)}
    bad = [f"{k} {a} vs model {b}" for k, (a, b) in expected.items() if a != b]
    if bad:
        raise CheckpointError(f"{path} does not fit {model.pretrained_cfg.get('architecture')}: "
                              f"shape mismatch: {_first(bad)}")


def load_pretrained(model: nn.Module, path: str) -> nn.Module:
    """Load a local pre-trained file into a plain timm model (before RLRR is applied)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"pre-trained file not found: {path}")
    if path.endswith(".npz"):
        if not isinstance(model, VisionTransformer):
            raise CheckpointError(f"{path}: .npz files are Google ViT checkpoints; "
                                  f"{type(model).__name__} needs a .pth or .safetensors file")
        _check_npz(model, path)
        try:
            model.load_pretrained(path)  # timm's reader of the Google format, pos-embed resampling included
        except Exception as e:
            raise CheckpointError(f"{path}: timm could not load it ({type(e).__name__}: {e})") from None
    elif path.endswith(STATE_DICT_SUFFIXES):
        _load_state_dict_file(model, path)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format; expected one of .npz "
                              + " ".join(STATE_DICT_SUFFIXES))
    return model
