"""Top-1/top-5 accuracy over a split, each sample counted once across all ranks (torchmetrics)."""
from typing import Callable, Optional

import torch
import torch.nn as nn
from torchmetrics.classification import MulticlassAccuracy

from .data.transforms import normalize
from .distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def evaluate(engine, loader, info: DistInfo, num_classes: int, stats: str,
             interrupted: Callable[[], bool] = lambda: False, heartbeat: Callable[[], None] = lambda: None
             ) -> Optional[dict]:
    """Accuracy over ``loader``'s split; a count other than the split's (padding, a lost shard) is an
    error. None if ``interrupted()`` became true on any rank (all ranks stop together).

    Ranks may hold different numbers of batches (exactly-once evaluation); the ranks step in lockstep,
    one small all-reduce per batch, and a rank that has run out makes ignored forward passes while
    others still have batches (ZeRO-3 gathers weights collectively). An engine that replays CUDA
    graphs (``static_shapes``) gets every batch at the loader's batch size: a short one is padded with
    zeros and the padded rows' logits are dropped (eval mode: no sample sees another)."""
    fixed = engine.static_shapes
    model = engine.model
    model.eval()
    top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro").to(info.device)
    top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro").to(info.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=info.device)  # loss sum, count
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
        logits = engine.forward(_padded(images, loader.batch_size) if fixed else images)[:len(labels)]
        top1.update(logits, labels)
        top5.update(logits, labels)
        loss_sum += torch.tensor([nn.functional.cross_entropy(logits, labels, reduction="sum").item(), len(labels)],
                                 dtype=torch.float64, device=info.device)
    all_reduce_sum(info, loss_sum)
    seen, expected = int(loss_sum[1].item()), loader.split.num_samples
    if seen != expected:
        raise RuntimeError(f"evaluation of {loader.split.name} saw {seen} samples, the split has {expected}")
    model.train()
    return {"acc1": 100.0 * top1.compute().item(), "acc5": 100.0 * top5.compute().item(),
            "loss": loss_sum[0].item() / max(1, seen), "samples": seen}


def _padded(images: torch.Tensor, size: int) -> torch.Tensor:
    if len(images) == size:
        return images
    return torch.cat([images, images.new_zeros((size - len(images), *images.shape[1:]))])
