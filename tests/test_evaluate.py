"""rlrr.evaluate's counts against torchmetrics (micro-averaged MulticlassAccuracy, MulticlassConfusionMatrix):
the same definitions of top-1 (argmax, ties to the first class) and top-5, on random and on tied logits,
over batches of different sizes."""
import pytest
import torch

from rlrr.distributed import DistInfo
from rlrr.evaluate import Scores


@pytest.mark.parametrize("num_classes", [3, 10])
@pytest.mark.parametrize("tied", [False, True])
def test_scores_equal_torchmetrics_over_uneven_batches(num_classes, tied):
    # here: importing torchmetrics (and the transformers it loads) is 1.2 s in every pytest worker's collection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
    g = torch.Generator().manual_seed(num_classes + 7 * tied)
    logits = torch.randn(101, num_classes, generator=g)
    if tied:  # few distinct values: most rows hold ties, at the top and around the 5th place
        logits = (logits * 1.5).round()
    labels = torch.randint(0, num_classes, (101,), generator=g)
    scores = Scores(num_classes, torch.device("cpu"), confusion=True)
    k = min(5, num_classes)
    top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
    topk = MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro")
    cm = MulticlassConfusionMatrix(num_classes=num_classes)
    for lo, hi in ((0, 32), (32, 64), (64, 96), (96, 101)):
        scores.update(logits[lo:hi], labels[lo:hi])
        for metric in (top1, topk, cm):
            metric.update(logits[lo:hi], labels[lo:hi])
    out = scores.result(DistInfo())
    assert out["samples"] == 101
    # torchmetrics divides in float32: its ratio is within one float32 rounding of the exact one
    assert out["acc1"] == pytest.approx(100.0 * top1.compute().item(), rel=2 ** -23)
    assert out["acc5"] == pytest.approx(100.0 * topk.compute().item(), rel=2 ** -23)
    assert out["confusion"] == cm.compute().tolist()
    assert round(out["acc1"] * 101 / 100) == sum(out["confusion"][c][c] for c in range(num_classes))
    # the loss: float32 cross-entropy summed over at most 32 positive terms per batch, the batches in float64;
    # each term and each addition round by at most 2**-24 of the sum, 64 * 2**-24 bounds it with room
    exact = torch.nn.functional.cross_entropy(logits.double(), labels).item()
    assert out["loss"] == pytest.approx(exact, rel=64 * 2 ** -24)
    per_class = [100.0 * row[c] / max(1, sum(row)) for c, row in enumerate(out["confusion"])]
    assert out["per_class_acc1"] == pytest.approx(per_class, rel=2 ** -22)  # float32: two roundings
