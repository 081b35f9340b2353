"""Top-1/top-5 accuracy over a split, each sample counted once across all ranks (torchmetrics)."""
import torch
import torch.nn as nn
from torchmetrics.classification import MulticlassAccuracy

from .distributed import DistInfo, all_reduce_sum
from .data.transforms import normalize


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: DistInfo, num_classes: int, expected: int, stats: str,
             autocast) -> dict:
    """``expected`` is the split's sample count; anything else (padding, a lost shard) is an error."""
    model.eval()
    top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro").to(info.device)
    top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro").to(info.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=info.device)  # loss sum, count
    for images, labels, _ in loader:
        images, labels = normalize(images.to(info.device, non_blocking=True), stats), labels.to(info.device)
        with autocast():
            logits = model(images)
        logits = logits.float()
        top1.update(logits, labels)
        top5.update(logits, labels)
        loss_sum += torch.tensor([nn.functional.cross_entropy(logits, labels, reduction="sum").item(), len(labels)],
                                 dtype=torch.float64, device=info.device)
    all_reduce_sum(info, loss_sum)
    seen = int(loss_sum[1].item())
    if seen != expected:
        raise RuntimeError(f"evaluation saw {seen} samples, the split has {expected}")
    model.train()
    return {"acc1": 100.0 * top1.compute().item(), "acc5": 100.0 * top5.compute().item(),
            "loss": loss_sum[0].item() / max(1, seen), "samples": seen}
