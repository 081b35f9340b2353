"""apply_rlrr / merge_rlrr / save_adapter / load_adapter on real timm ViT and Swin models."""
import copy

import pytest
import timm
import torch

from rlrr import (
    RLRRConfig,
    RLRRLinear,
    ScaleShift,
    apply_rlrr,
    count_trainable,
    create_model,
    load_adapter,
    merge_rlrr,
    save_adapter,
)

from helpers import randomize_trainable


@pytest.mark.parametrize("name,expected", [
    ("vit_base_patch16_224", 288_768),
    ("vit_large_patch16_224", 765_952),
    ("vit_huge_patch14_224", 1_274_880),
    ("swin_base_patch4_window7_224", 358_144),
])
def test_trainable_parameter_counts_match_the_paper(name, expected):
    with torch.device("meta"):
        model = create_model(name, num_classes=0)
    assert count_trainable(model) == expected


def test_vit_base_layer_shapes_and_head():
    with torch.device("meta"):
        model = create_model("vit_base_patch16_224", num_classes=100)
    assert model.blocks[0].attn.qkv.scale_in.shape == (3, 768)
    assert model.blocks[0].mlp.fc1.scale_out.shape == (3072,)
    assert count_trainable(model) == 288_768 + 768 * 100 + 100
    split_off = create_model("test_vit", num_classes=0, config=RLRRConfig(split_qkv=False))
    assert split_off.blocks[0].attn.qkv.scale_in.shape == (1, 64)
    with torch.device("meta"):
        swin = create_model("swin_base_patch4_window7_224", num_classes=0)
    assert swin.layers[0].blocks[0].attn.qkv.scale_in.shape == (1, 128)
    assert isinstance(swin.layers[1].downsample.reduction, RLRRLinear)


def test_head_starts_at_zero_and_everything_else_frozen():
    model = create_model("test_vit", num_classes=7)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in trainable:
        assert n.startswith("head.") or n.rsplit(".", 1)[1] in {
            "scale_in", "scale_out", "bias_shift", "ssf_scale", "ssf_shift"}, n
    assert "patch_embed.proj.ssf_scale" in trainable and "blocks.0.attn.qkv.weight" not in trainable


@pytest.mark.parametrize("name,kwargs", [("test_vit", {}), ("test_vit2", {}),
                                          ("swin_tiny_patch4_window7_224", {"img_size": 112, "window_size": 7})])
def test_identity_init_reproduces_pretrained_features(name, kwargs):
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=0, **kwargs).eval()
    adapted = apply_rlrr(copy.deepcopy(plain), RLRRConfig(init="identity")).eval()
    x = torch.randn(2, 3, kwargs.get("img_size", 224), kwargs.get("img_size", 224))
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), plain(x), atol=1e-5, rtol=1e-5)
    official = apply_rlrr(copy.deepcopy(plain)).eval()  # the reference init moves the features
    with torch.no_grad():
        assert (official(x) - plain(x)).abs().max() > 1e-2


# ViT-B's and Swin-B's widths and modules, fewer blocks and a smaller image: the merge is per layer, so the
# full depth (4 s each, 10x the work) would check nothing more. Swin keeps a shifted pair in every stage.
@pytest.mark.parametrize("name,kwargs", [("vit_base_patch16_224", {"depth": 2, "img_size": 64}),
                                         ("swin_base_patch4_window7_224", {"depths": (2, 2, 2, 2), "img_size": 112})],
                         ids=["vit_base_patch16_224", "swin_base_patch4_window7_224"])
def test_merge_is_exact_and_loads_strictly_into_plain_timm(name, kwargs):
    model = create_model(name, num_classes=10, **kwargs).eval()
    randomize_trainable(model, seed=1)
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        adapted_logits = model(x)
    merged = merge_rlrr(model)
    assert type(merged) is type(timm.create_model(name, num_classes=0, pretrained=False))
    assert not any(isinstance(m, (RLRRLinear, ScaleShift)) for m in merged.modules())
    plain = timm.create_model(name, num_classes=10, **kwargs).eval()
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        diff = (plain(x) - adapted_logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert adapted_logits.abs().max() > 0.1  # a non-trivial comparison


def test_merge_in_bf16_casts_once_and_stays_close():
    model = create_model("test_vit", num_classes=5).eval()
    randomize_trainable(model, seed=2)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    merged = merge_rlrr(model.to(torch.bfloat16))
    assert merged.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = merged(x.bfloat16()).float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_merge_refuses_non_finite_and_unadapted_models():
    model = create_model("test_vit", num_classes=3)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.scale_in.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        merge_rlrr(model)
    with pytest.raises(ValueError, match="no RLRR layers"):
        merge_rlrr(timm.create_model("test_vit"))


def test_bad_options_are_refused_where_the_config_is_made():
    for kwargs, message in (({"init": "zeros"}, "RLRRConfig: init = 'zeros': expected one of auto, official, identity"),
                            ({"split_qkv": "yes"}, "RLRRConfig: split_qkv = 'yes': expected bool"),
                            ({"ssf": 1}, "RLRRConfig: ssf = 1: expected bool")):
        with pytest.raises(ValueError) as e:
            RLRRConfig(**kwargs)
        assert str(e.value) == message


def test_unsupported_architecture_and_double_application_are_clear_errors():
    with pytest.raises(TypeError, match="RLRR found nothing to adapt in Sequential: it is not a timm ViT or Swin"):
        apply_rlrr(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    model = create_model("test_vit", num_classes=2)
    with pytest.raises(ValueError, match="already has RLRR layers"):
        apply_rlrr(model)


def test_adapter_round_trip(tmp_path):
    torch.manual_seed(0)  # same random backbone for both models; the adapter carries the rest
    src = create_model("test_vit", num_classes=4)
    randomize_trainable(src, seed=3)
    path = tmp_path / "a.safetensors"
    save_adapter(src, str(path))
    torch.manual_seed(0)
    dst = create_model("test_vit", num_classes=4)
    metadata = load_adapter(dst, str(path))
    assert metadata["backbone"] == "test_vit" and metadata["num_classes"] == "4"
    src_state = dict(src.named_parameters())
    for n, p in dst.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, src_state[n]), n
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src.eval()(x))
    assert not list(tmp_path.glob(".adapter-*"))  # no temporary left behind


def test_adapter_file_holds_only_trainable_tensors(tmp_path):
    from safetensors import safe_open
    model = create_model("test_vit", num_classes=4)
    save_adapter(model, str(tmp_path / "a.safetensors"))
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}


def test_adapter_mismatches_are_reported_together(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_adapter(create_model("test_vit", num_classes=4), path)
    with pytest.raises(ValueError) as e:
        load_adapter(create_model("test_vit", num_classes=5, depth=5), path)
    msg = str(e.value)
    assert "does not fit test_vit" in msg and path in msg
    assert "shape of head.weight: file (4, 64) vs model (5, 64)" in msg
    assert "unexpected blocks.5.attn.qkv.scale_in (3, 64)" in msg
    assert "\n" not in msg
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        load_adapter(create_model("test_vit", num_classes=4), str(tmp_path / "junk.safetensors"))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_adapter(create_model("test_vit", num_classes=4), str(tmp_path / "nope.safetensors"))


def test_optimizer_step_changes_only_adapter_and_head():
    model = create_model("test_vit", num_classes=3)
    randomize_trainable(model)  # a non-zero head, so the backbone receives gradients
    before = {n: t.clone() for n, t in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.tensor([0, 2]))
    loss.backward()
    opt.step()
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == trainable


@pytest.mark.parametrize("name", ["test_vit", "swin_tiny_patch4_window7_224"])
def test_every_trainable_tensor_gets_a_gradient_with_grad_checkpointing(name):
    kwargs = {"img_size": 112} if name.startswith("swin") else {}
    model = create_model(name, num_classes=3, **kwargs)
    randomize_trainable(model)
    model.set_grad_checkpointing(True)
    model(torch.randn(2, 3, kwargs.get("img_size", 224), kwargs.get("img_size", 224))).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing
