"""Top-1/top-5 accuracy, the mean loss and (on request) the confusion matrix over a split, each sample
counted once across all ranks (torchmetrics). The one implementation: training's evaluations and
tools/evaluate.py both call ``evaluate``."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from .data.transforms import normalize
from .distributed import DistInfo, all_reduce_sum


@dataclass
class PlainModel:
    """A model outside training, read by ``evaluate`` as it reads a training engine."""
    model: nn.Module
    static_shapes: bool = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).float()


class Scores:
    """Running top-1/top-5 accuracy, loss sum and count (and the confusion matrix, rows = true class)
    of this rank; ``result`` combines every rank's."""

    def __init__(self, num_classes: int, device: torch.device, confusion: bool = False):
        self.top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro").to(device)
        self.top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro").to(device)
        self.confusion = MulticlassConfusionMatrix(num_classes=num_classes).to(device) if confusion else None
        self.loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, count

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.top1.update(logits, labels)
        self.top5.update(logits, labels)
        if self.confusion is not None:
            self.confusion.update(logits, labels)
        self.loss_sum += torch.tensor([nn.functional.cross_entropy(logits, labels, reduction="sum").item(),
                                       len(labels)], dtype=torch.float64, device=self.loss_sum.device)

    def result(self, info: DistInfo) -> dict:
        """Every rank's samples together (collective: torchmetrics syncs its states on compute)."""
        all_reduce_sum(info, self.loss_sum)
        seen = int(self.loss_sum[1].item())
        out = {"acc1": 100.0 * self.top1.compute().item(), "acc5": 100.0 * self.top5.compute().item(),
               "loss": self.loss_sum[0].item() / max(1, seen), "samples": seen}
        if self.confusion is not None:
            cm = self.confusion.compute().long().cpu()
            out["per_class_acc1"] = (100.0 * cm.diagonal() / cm.sum(1).clamp(min=1)).tolist()
            out["confusion"] = cm.tolist()
        return out


@torch.no_grad()
def evaluate(engine, loader, info: DistInfo, num_classes: int, stats: str,
             interrupted: Callable[[], bool] = lambda: False, heartbeat: Callable[[], None] = lambda: None,
             confusion: bool = False) -> Optional[dict]:
    """Accuracy over ``loader``'s split (``engine``: a training engine, or a PlainModel); a count other
    than the split's (padding, a lost shard) is an error. None if ``interrupted()`` became true on
    any rank (all ranks stop together).

    Ranks may hold different numbers of batches (exactly-once evaluation); the ranks step in lockstep,
    one small all-reduce per batch, and a rank that has run out makes ignored forward passes while
    others still have batches (ZeRO-3 gathers weights collectively). An engine that runs a compiled
    model or replays CUDA graphs (``static_shapes``) gets every batch at the loader's batch size: a
    short one is padded with zeros and the padded rows' logits are dropped (eval mode: no sample sees
    another)."""
    fixed = engine.static_shapes
    model = engine.model
    model.eval()
    scores = Scores(num_classes, info.device, confusion)
    batches = iter(loader.epoch(0))
    while True:
        batch = next(batches, None)
        flags = all_reduce_sum(info, torch.tensor([float(batch is not None), float(interrupted())], device=info.device))
        if flags[1] > 0:
            model.train()
            return None
        if flags[0] == 0:
            break
        heartbeat()
        if batch is None:
            size = loader.recipe.image_size
            engine.forward(torch.zeros(loader.batch_size if fixed else 1, 3, size, size, device=info.device))
            continue
        images, labels = normalize(batch[0].to(info.device, non_blocking=True), stats), batch[1].to(info.device)
        scores.update(engine.forward(_padded(images, loader.batch_size) if fixed else images)[:len(labels)], labels)
    result = scores.result(info)
    if result["samples"] != loader.split.num_samples:
        raise RuntimeError(f"evaluation of {loader.split.name} saw {result['samples']} samples, the split has "
                           f"{loader.split.num_samples}")
    model.train()
    return result


def _padded(images: torch.Tensor, size: int) -> torch.Tensor:
    if len(images) == size:
        return images
    return torch.cat([images, images.new_zeros((size - len(images), *images.shape[1:]))])
