"""Top-1/top-5 accuracy, the mean loss and (on request) the confusion matrix over a split, each sample
counted once across all ranks. The one implementation: training's evaluations and tools/evaluate.py
both call ``evaluate``."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .data.transforms import normalize
from .distributed import DistInfo, all_reduce_sum, sum_over_ranks


@dataclass
class PlainModel:
    """A model outside training, read by ``evaluate`` as it reads a training engine."""
    model: nn.Module
    static_shapes: bool = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).float()


class Scores:
    """This rank's counts: samples, top-1 and top-5 hits, the loss sum (and the confusion matrix, rows =
    true class); ``result`` adds every rank's in one all-reduce. Counts, not per-batch means, so that
    accuracies are exact whatever the batches and ranks: float64 holds every count below 2**53 exactly.

    Top-1 is the argmax (the first of tied logits), top-5 any of ``topk``'s five; the same definitions
    as torchmetrics' micro-averaged MulticlassAccuracy, which tests/test_evaluate.py checks them against.
    torchmetrics itself is not used here: importing it costs about 1.1 s in every training process (its
    text metrics import transformers), for three sums that fit in the all-reduce the loss needs anyway."""

    def __init__(self, num_classes: int, device: torch.device, confusion: bool = False):
        self.num_classes, self.k = num_classes, min(5, num_classes)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # samples, top-1, top-5 hits, loss sum
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device) \
            if confusion else None

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        predicted = logits.argmax(1)
        in_top = logits.topk(self.k, dim=1).indices.eq(labels[:, None]).any(1)
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        self.sums += torch.stack([labels.new_tensor(len(labels)).double(), predicted.eq(labels).sum().double(),
                                  in_top.sum().double(), loss.double()])
        if self.confusion is not None:
            self.confusion += torch.bincount(labels * self.num_classes + predicted,
                                             minlength=self.num_classes ** 2).double()

    def result(self, info: DistInfo) -> dict:
        """Every rank's samples together (collective)."""
        sums = all_reduce_sum(info, self.sums.clone()).tolist()
        seen = int(sums[0])
        out = {"acc1": 100.0 * sums[1] / max(1, seen), "acc5": 100.0 * sums[2] / max(1, seen),
               "loss": sums[3] / max(1, seen), "samples": seen}
        if self.confusion is not None:
            cm = all_reduce_sum(info, self.confusion.clone()).long().cpu().view(self.num_classes, self.num_classes)
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
        has_batch, stop = sum_over_ranks(info, [batch is not None, interrupted()])
        if stop > 0:
            model.train()
            return None
        if has_batch == 0:
            break
        heartbeat()
        if batch is None:
            size = loader.recipe.image_size
            engine.forward(torch.zeros(loader.batch_size if fixed else 1, 3, size, size, device=info.device))
            continue
        images = normalize(batch[0].to(info.device, non_blocking=True), stats)
        labels = batch[1].to(info.device, non_blocking=True)
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
