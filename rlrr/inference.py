"""Using a finished run: its inference card, the exact inference model, its eval preprocessing for
image files, and many tasks on one backbone (AdapterBank).

A run directory holds everything inference needs: ``inference.json`` (class names, the backbone, the
eval preprocessing: how the shards were resized, the recipe's resize/crop and the normalisation),
``config.yaml``, ``merged.safetensors`` (a plain timm model) and ``adapter.safetensors``.

    model, card = load_model("runs/vtab/kitti")                       # the merged model
    model, card = load_model("runs/vtab/kitti", source="adapter")     # backbone file + adapter
    pre = Preprocess(card); logits = model(pre.batch([pre.load("a.jpg")]))
"""
import dataclasses
import io
import json
import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

from .adapter import check_adapter_fit, load_adapter, read_adapter, statistics_buffers, trainable_parameters
from .atomic import write_json_atomic
from .config import ConfigError, RunConfig, flat_dict, load_config
from .data.shards import shard_resize
from .data.transforms import MEAN_STD, Recipe, normalize

CARD = "inference.json"
CARD_FORMAT = "rlrr.inference/1"


def inference_card(cfg: RunConfig, class_names: list[str], shard_preprocessing: dict, sized: bool) -> dict:
    """What a run directory must say so that inference needs nothing else. ``sized``: the model takes
    an img_size (ViT, Swin), so timm must be told it."""
    m, d = cfg.model, cfg.data
    mean, std = MEAN_STD[d.stats]
    size_kwarg = f", img_size={m.img_size}" if sized else ""
    n = len(class_names)
    return {
        "format": CARD_FORMAT, "backbone": m.name, "method": m.method, "pretrained": m.pretrained,
        "num_classes": len(class_names), "class_names": list(class_names), "img_size": m.img_size,
        "timm_kwargs": m.timm_kwargs,
        "preprocessing": {"shards": {k: shard_preprocessing.get(k) for k in ("image_size", "resize", "interpolation")},
                          "recipe": d.recipe, "image_size": m.img_size, "stats": d.stats,
                          "mean": list(mean), "std": list(std)},
        # the overlay's num_classes tells timm the file's head fits, so it keeps it
        "timm": f"timm.create_model({m.name!r}, pretrained=True, num_classes={n}{size_kwarg}, "
                f"pretrained_cfg_overlay=dict(file='merged.safetensors', num_classes={n}))",
    }


def write_card(run_dir: str, card: dict) -> None:
    write_json_atomic(os.path.join(run_dir, CARD), card)


def read_card(run_dir: str) -> dict:
    path = os.path.join(run_dir, CARD)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist: not a run directory (or a run from before inference cards)")
    with open(path) as f:
        card = json.load(f)
    if card.get("format") != CARD_FORMAT:
        raise ConfigError(f"{path}: format {card.get('format')!r}, expected {CARD_FORMAT!r}")
    return card


def create_plain(card: dict) -> nn.Module:
    """The plain timm model of the card (random weights), as merged.safetensors expects it."""
    from .model import create_timm
    return create_timm(card["backbone"], card["img_size"], num_classes=card["num_classes"], **card["timm_kwargs"])


def load_model(run_dir: str, source: str = "merged", backbone: Optional[str] = None,
               device: str = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, card). ``source="merged"``: merged.safetensors into a plain timm model
    (strict); ``"adapter"``: the run's backbone (or ``backbone``, a local pre-trained file) adapted
    as in training, with adapter.safetensors loaded."""
    card = read_card(run_dir)
    if source == "merged":
        path = os.path.join(run_dir, "merged.safetensors")
        if not os.path.isfile(path):
            raise ConfigError(f"{path} does not exist: the run has not finished")
        model = create_plain(card)
        model.load_state_dict(load_file(path), strict=True)
    elif source == "adapter":
        model = adapted_backbone(run_dir, backbone)[0]
        load_adapter(model, os.path.join(run_dir, "adapter.safetensors"))
    else:
        raise ValueError(f"source must be 'merged' or 'adapter', got {source!r}")
    return model.to(device).eval(), card


def adapted_backbone(run_dir: str, backbone: Optional[str] = None) -> tuple[nn.Module, RunConfig]:
    """The run's model before training (pre-trained backbone, method applied, seeded), as training built it."""
    from .model import build_model
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    if backbone is not None:
        cfg.model = dataclasses.replace(cfg.model, pretrained=backbone)
    return build_model(cfg.model, read_card(run_dir)["num_classes"], seed=cfg.train.seed), cfg


class Preprocess:
    """The run's eval transform for image files: the shards' resize (PIL bicubic, as make_shards
    wrote them), then the recipe's resize and center crop, then the normalisation."""

    def __init__(self, card: dict):
        p = card["preprocessing"]
        self.shards, self.stats = p["shards"], p["stats"]
        self.recipe = Recipe(p["recipe"], train=False, image_size=p["image_size"])

    def load(self, path_or_bytes) -> torch.Tensor:
        """uint8 CHW RGB at the recipe's size; raises on an unreadable image."""
        src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
        with Image.open(src) as pil:
            pil.load()
            pil = pil.convert("RGB")
            if self.shards.get("image_size"):
                pil = shard_resize(pil, self.shards["image_size"], self.shards.get("resize") or "square")
            image = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
        return self.recipe.resize(image)

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """A normalised float batch from ``load``'s (or the shards' decoded) uint8 images."""
        return normalize(self.recipe.augment(torch.stack([self.recipe.resize(i) for i in images])), self.stats)


class AdapterBank:
    """One frozen backbone in memory and any number of task adapters; ``use(task)`` switches by
    copying only the adapter tensors (and BatchNorm statistics) into the model and putting the task's
    own head in place: no backbone reload.

        bank = AdapterBank.from_runs(["runs/kitti", "runs/dtd"])
        bank.use("dtd"); logits = bank.model(images)
    """

    def __init__(self, model: nn.Module, cfg: RunConfig):
        """``model``: an adapted model as training builds it (``cfg.model``), whose adapter tensors
        the tasks overwrite."""
        self.model, self.cfg = model.eval(), cfg
        self.head_path = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
        self.tasks: dict[str, dict] = {}
        self.current: Optional[str] = None

    @classmethod
    def from_runs(cls, run_dirs: list[str], names: Optional[list[str]] = None,
                  backbone: Optional[str] = None) -> "AdapterBank":
        model, cfg = adapted_backbone(run_dirs[0], backbone)
        bank = cls(model, cfg)
        for i, run in enumerate(run_dirs):
            bank.add(names[i] if names else os.path.basename(os.path.normpath(run)), run)
        return bank

    def add(self, name: str, run_dir: str) -> None:
        """Read a run's adapter (checked against the bank's backbone and method) into memory."""
        cfg = load_config(os.path.join(run_dir, "config.yaml"))
        mine, theirs = flat_dict(dataclasses.asdict(self.cfg.model)), flat_dict(dataclasses.asdict(cfg.model))
        differ = [k for k in mine if mine[k] != theirs.get(k) and k not in ("drop_path", "drop_path_mode")]
        if differ or (self.cfg.model.pretrained is None and cfg.train.seed != self.cfg.train.seed):
            what = ", ".join(f"model.{k}: {theirs.get(k)!r} vs {mine[k]!r}" for k in differ) or \
                "no pre-trained file and another seed (a different random backbone)"
            raise ValueError(f"AdapterBank: {run_dir} was trained on another backbone or method ({what})")
        self.add_adapter(name, os.path.join(run_dir, "adapter.safetensors"), card=read_card(run_dir))

    def add_adapter(self, name: str, path: str, card: Optional[dict] = None) -> None:
        """Read an adapter file (its tensors checked against the bank's model) into memory; the head
        may have any number of classes."""
        if name in self.tasks:
            raise ValueError(f"AdapterBank: task {name!r} is already in the bank")
        tensors, _ = read_adapter(path)
        prefix = self.head_path + "."
        body = {n: t for n, t in tensors.items() if not n.startswith(prefix)}
        own = {n: t for n, t in {**dict(trainable_parameters(self.model)), **statistics_buffers(self.model)}.items()
               if not n.startswith(prefix)}
        check_adapter_fit(body, own, path, self.cfg.model.name)
        weight, bias = tensors[prefix + "weight"], tensors.get(prefix + "bias")
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
        device = next(self.model.parameters()).device
        self.tasks[name] = {"tensors": {n: t.to(device) for n, t in body.items()}, "head": head.to(device).eval(),
                            "card": card, "path": path}

    @torch.no_grad()
    def use(self, name: str) -> nn.Module:
        """Make ``name`` the active task and return the model."""
        if name not in self.tasks:
            raise KeyError(f"AdapterBank: no task {name!r}; tasks: {', '.join(self.tasks)}")
        if name != self.current:
            own = {**dict(trainable_parameters(self.model)), **statistics_buffers(self.model)}
            for n, t in self.tasks[name]["tensors"].items():
                own[n].copy_(t)
            parent, _, child = self.head_path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, self.tasks[name]["head"])
            self.current = name
        return self.model
