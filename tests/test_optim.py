"""rlrr/optim.py: the reference's name-based weight-decay groups and the per-step warmup + cosine schedule."""
import math

import pytest
import torch

from rlrr.config import ModelConfig
from rlrr.model import build_model
from rlrr.optim import build_optimizer, build_scheduler, param_groups


def test_weight_decay_groups_follow_the_reference_names():
    model = build_model(ModelConfig(name="test_vit", img_size=32), num_classes=3)
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert {"blocks.0.attn.qkv.scale_in", "blocks.0.attn.qkv.scale_out", "patch_embed.proj.ssf_scale",
            "head.weight"} <= decay
    assert {"blocks.0.attn.qkv.bias_shift", "blocks.0.norm1.ssf_scale", "norm.ssf_shift", "head.bias"} <= no_decay
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert len(decay) + len(no_decay) == sum(p.requires_grad for p in model.parameters())


def test_schedule_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    opt = build_optimizer(torch.nn.Linear(2, 2), lr=1e-3, weight_decay=0.0)
    sched = build_scheduler(opt, total_steps=100, warmup_steps=10, warmup_lr=1e-7, min_lr=1e-8)
    lrs = []
    for step in range(100):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-7) and lrs[5] == pytest.approx(1e-7 + 5 * (1e-3 - 1e-7) / 10)
    cosine = [1e-8 + 0.5 * (1e-3 - 1e-8) * (1 + math.cos(math.pi * t / 100)) for t in range(100)]
    assert lrs[10:] == pytest.approx(cosine[10:], rel=1e-6)  # timm's cosine runs over all steps, warmup included
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine: never up after warmup
