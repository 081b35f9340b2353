"""rlrr/model.py: the one factory (methods, drop-path modes, attention, seeding) and the model utilities."""
import copy
import typing

import pytest
import timm
import torch

from rlrr import RLRRConfig, ScaleShift, count_trainable, create_model
from rlrr.config import Method, ModelConfig
from rlrr.model import METHODS, build_model, store_frozen_weights_in, use_fused_attention

from helpers import randomize_trainable


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"name": "test_vit", "img_size": 32, **kw})


def test_every_method_is_one_registry_entry_and_decides_what_trains():
    assert set(METHODS) == set(typing.get_args(Method))
    plain = timm.create_model("test_vit", img_size=32, num_classes=3)
    counts = {m: count_trainable(build_model(_cfg(method=m), 3)) for m in METHODS}
    head = 3 * plain.embed_dim + 3
    assert counts["linear"] == head
    assert counts["full"] == sum(p.numel() for p in plain.parameters())
    assert head < counts["rlrr"] < counts["full"]
    for m in METHODS:
        model = build_model(_cfg(method=m), 3)
        assert not model.head.weight.any() and model.head.weight.requires_grad, m  # every task starts at zero


def test_seed_gives_the_same_model_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(_cfg(), 3, seed=7)
    after = torch.rand(1)
    b = build_model(_cfg(), 3, seed=7)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_model(_cfg(), 3, seed=8)
    assert not torch.equal(a.blocks[0].attn.qkv.scale_out, c.blocks[0].attn.qkv.scale_out)


def test_rlrr_options_reach_the_adapter():
    no_ssf = build_model(_cfg(rlrr=RLRRConfig(ssf=False, split_qkv=False)), 3)
    assert not any(isinstance(m, ScaleShift) for m in no_ssf.modules())
    assert no_ssf.blocks[0].attn.qkv.scale_in.shape[0] == 1 and no_ssf.rlrr_config == RLRRConfig(split_qkv=False,
                                                                                                ssf=False)
    ident = build_model(_cfg(rlrr=RLRRConfig(init="identity")), 3)
    assert not ident.blocks[0].mlp.fc1.scale_out.any()


def test_create_model_is_the_factory_with_timm_defaults():
    model = create_model("test_vit", num_classes=5)
    assert model.patch_embed.img_size == (160, 160)  # timm's own default size for the model
    assert count_trainable(model) == count_trainable(build_model(ModelConfig(name="test_vit", img_size=160), 5))
    small = create_model("test_vit", num_classes=5, img_size=32, drop_path_rate=0.1)
    assert small.patch_embed.img_size == (32, 32)
    assert any(isinstance(m, timm.layers.DropPath) for m in small.modules())  # timm's stochastic depth, as asked


def test_drop_path_modes():
    model = build_model(_cfg(drop_path=0.2), num_classes=3)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert len(drops) == 2 * 5 and max(m.p for m in drops) == pytest.approx(0.2)  # linear 0 -> 0.2 over 6 blocks
    assert not any(isinstance(m, timm.layers.DropPath) for m in model.modules())
    sd = build_model(_cfg(drop_path=0.2, drop_path_mode="stochastic_depth"), 3)
    assert any(isinstance(m, timm.layers.DropPath) for m in sd.modules())


def test_grad_checkpointing_and_attention_choice_are_applied():
    model = build_model(_cfg(grad_checkpointing=True, fused_attn=False), 3)
    assert model.grad_checkpointing and not model.blocks[0].attn.fused_attn


def test_bf16_storage_touches_only_frozen_linear_weights():
    model = build_model(_cfg(), 3)
    saved = store_frozen_weights_in(model, torch.bfloat16)
    linear_weights = [m.weight for m in model.modules() if hasattr(m, "scale_in")]
    assert saved == sum(w.numel() * 2 for w in linear_weights)
    assert all(w.dtype == torch.bfloat16 for w in linear_weights)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model.blocks[0].norm1.base.weight.dtype == torch.float32


def test_fused_attention_on_swin_equals_the_explicit_softmax():
    """model.fused_attn (default on): Swin's window attention through SDPA, shifted windows' mask and
    relative position bias included, gives the explicit path's outputs and adapter gradients."""
    explicit = create_model("swin_tiny_patch4_window7_224", num_classes=3, img_size=112)
    randomize_trainable(explicit)
    fused = copy.deepcopy(explicit)
    assert use_fused_attention(explicit, False) == 12 and use_fused_attention(fused) == 12  # 2+2+6+2 blocks
    assert fused.layers[0].blocks[1].shift_size != (0, 0) and not explicit.layers[0].blocks[1].attn.fused_attn
    x = torch.randn(2, 3, 112, 112)
    results = []
    for model in (explicit, fused):
        torch.manual_seed(0)  # the same drop-path draws
        y = model.train()(x)
        y.logsumexp(-1).sum().backward()
        results.append([y.detach()] + [p.grad for _, p in sorted(model.named_parameters()) if p.requires_grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
