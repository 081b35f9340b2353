"""rlrr/engine.py, in process: the DDP engine's accumulation and its checkpoint round trip."""
import torch

from rlrr.config import load_config
from rlrr.distributed import DistInfo
from rlrr.engine import ENGINES, DDPEngine
from rlrr.model import build_model


def _engine(tmp_cfg, accum=1):
    cfg = load_config(None, ["data.shards=x", "model.name=test_vit", "model.img_size=32",
                             f"train.grad_accum={accum}", "train.batch_size=4", *tmp_cfg])
    model = build_model(cfg.model, num_classes=3, seed=0)
    with torch.no_grad():
        # a non-zero head, so the backbone gets gradients
        model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    return model, DDPEngine(model, cfg, DistInfo(), micro=4 // accum)


def test_every_engine_name_has_a_class():
    assert set(ENGINES) == {"ddp", "deepspeed"}


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches of 2 with grad_accum=2 leave the same gradients as one batch of 4."""
    grads = []
    for accum in (1, 2):
        model, engine = _engine([], accum)
        torch.manual_seed(1)
        images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
        for chunk in range(accum):
            part = slice(chunk * 4 // accum, (chunk + 1) * 4 // accum)
            engine.backward(images[part], labels[part], last_micro=chunk == accum - 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-4, msg=n)


def test_a_non_finite_loss_or_gradient_never_reaches_the_weights():
    model, engine = _engine([])
    before = engine.trainable_fp32()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    loss, done = engine.backward(images, labels, last_micro=True, loss_ok=lambda x: False)
    assert not done and all(p.grad is None for p in model.parameters())  # no backward ran
    engine.backward(images, labels, last_micro=True)
    model.head.weight.grad[0, 0] = float("nan")
    norm, applied = engine.step()
    assert not applied and norm != norm  # NaN norm: no update
    after = engine.trainable_fp32()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in model.parameters())  # and the bad gradients are gone


def test_clipping_bounds_the_update_and_checkpoint_round_trips(tmp_path):
    model, engine = _engine(["train.clip_grad=0.001"])
    engine.backward(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1]), last_micro=True)
    norm, applied = engine.step()
    assert norm > 0.001 and applied  # the norm before clipping is reported
    engine.save(str(tmp_path), {"state": {"global_step": 1}})
    trained = engine.trainable_fp32()
    other_model, other = _engine([])
    assert other.checkpoints(str(tmp_path)) == ["last.pt"]
    other.load(str(tmp_path), "last.pt")
    assert all(torch.equal(trained[n], t) for n, t in other.trainable_fp32().items())
    assert other.optimizer.state_dict()["state"].keys() == engine.optimizer.state_dict()["state"].keys()
