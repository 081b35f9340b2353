"""RLRRLinear and ScaleShift against direct computations of docs/method.md, sections 1 and 2."""
import math

import pytest
import torch
import torch.nn as nn

from rlrr.layers import RLRRLinear, ScaleShift, fold_bias_into_preceding_norm


def _linear(out_f=12, in_f=8, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def test_rlrr_linear_matches_elementwise_formula():
    base = _linear()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = RLRRLinear(base)
    with torch.no_grad():
        layer.bias_shift.normal_()
    x = torch.randn(5, 8)
    expected = torch.empty(5, 12)
    s_in, s_out, f = layer.scale_in[0], layer.scale_out, layer.bias_shift
    for n in range(5):
        for o in range(12):
            expected[n, o] = sum(x[n, i] * w0[o, i] * (1 + s_out[o] * s_in[i]) for i in range(8)) + b0[o] + f[o]
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_grouped_input_scale_equals_separate_qkv_layers():
    """in_groups=3 on a fused qkv == three separate layers, each with its own s_in (official ViT)."""
    base = _linear(out_f=3 * 4, in_f=4)
    fused = RLRRLinear(base, in_groups=3)
    x = torch.randn(2, 7, 4)
    parts = []
    for g in range(3):
        rows = slice(4 * g, 4 * (g + 1))
        w = base.weight[rows] * (1 + fused.scale_out[rows, None] * fused.scale_in[g][None, :])
        parts.append(x @ w.T + base.bias[rows] + fused.bias_shift[rows])
    torch.testing.assert_close(fused(x), torch.cat(parts, -1))
    assert fused.scale_in.shape == (3, 4)


def test_official_init_bounds_and_identity_init():
    layer = RLRRLinear(_linear(out_f=3072, in_f=768))
    assert layer.scale_in.abs().max() <= math.sqrt(6 / 768) and layer.scale_in.abs().max() > 0.08
    assert layer.scale_out.abs().max() <= math.sqrt(6) and layer.scale_out.abs().max() > 2.3
    assert torch.count_nonzero(layer.bias_shift) == 0
    base = _linear()
    w0 = base.weight.detach().clone()
    ident = RLRRLinear(base, init="identity")
    x = torch.randn(3, 8)
    torch.testing.assert_close(ident(x), x @ w0.T + base.bias)
    assert torch.count_nonzero(ident.scale_in) > 0  # so s_out receives a gradient


def test_only_adapter_vectors_are_trainable_and_receive_gradients():
    layer = RLRRLinear(_linear())
    layer(torch.randn(4, 8)).square().sum().backward()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    for p in (layer.scale_in, layer.scale_out, layer.bias_shift):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # identity start: s_out = 0, so s_in's first gradient is 0 but s_out's is not (training can start)
    ident = RLRRLinear(_linear(), init="identity")
    ident(torch.randn(4, 8)).square().sum().backward()
    assert ident.scale_in.grad.abs().sum() == 0 and ident.scale_out.grad.abs().sum() > 0


def test_merged_linear_is_exact_and_bias_free_base_gets_a_bias():
    layer = RLRRLinear(_linear(bias=False))
    with torch.no_grad():
        layer.bias_shift.normal_()
    x = torch.randn(6, 8)
    merged = layer.merged()
    assert type(merged) is nn.Linear and merged.bias is not None
    torch.testing.assert_close(merged(x), layer(x), atol=1e-6, rtol=1e-5)


def test_fold_bias_into_norm_keeps_the_function():
    norm = nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    expected = lin(norm(x))
    bias_free = fold_bias_into_preceding_norm(lin, norm)
    assert bias_free.bias is None
    torch.testing.assert_close(bias_free(norm(x)), expected, atol=1e-5, rtol=1e-5)


def test_merge_refuses_non_finite():
    layer = RLRRLinear(_linear())
    with torch.no_grad():
        layer.scale_out[0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merged()


@pytest.mark.parametrize("init", ["official", "identity"])
def test_scale_shift_on_layernorm_and_conv_folds_exactly(init):
    norm = nn.LayerNorm(6)
    ssf = ScaleShift(norm, 6, -1, init)
    with torch.no_grad():
        ssf.ssf_scale.normal_(1, 0.3)
        ssf.ssf_shift.normal_()
    x = torch.randn(2, 3, 6)
    expected = nn.functional.layer_norm(x, (6,), norm.weight, norm.bias, norm.eps) * ssf.ssf_scale + ssf.ssf_shift
    torch.testing.assert_close(ssf(x), expected)
    out = ssf(x).detach()
    torch.testing.assert_close(ssf.merged()(x), out, atol=1e-6, rtol=1e-5)

    conv = nn.Conv2d(3, 5, 2, stride=2)
    ssf = ScaleShift(conv, 5, 1, init)
    with torch.no_grad():
        ssf.ssf_scale.normal_(1, 0.3)
        ssf.ssf_shift.normal_()
    img = torch.randn(2, 3, 4, 4)
    expected = conv(img) * ssf.ssf_scale.view(1, 5, 1, 1) + ssf.ssf_shift.view(1, 5, 1, 1)
    torch.testing.assert_close(ssf(img), expected)
    torch.testing.assert_close(ssf.merged()(img), expected.detach(), atol=1e-6, rtol=1e-5)


def _reference_forward(layer, x):
    """The reference formulation: build W' with autograd and call F.linear (docs/method.md, section 1)."""
    s_in = layer.scale_in.repeat_interleave(layer.out_features // layer.in_groups, dim=0)
    w = layer.weight * (1 + layer.scale_out[:, None] * s_in)
    b = layer.bias_shift if layer.bias is None else layer.bias + layer.bias_shift
    return torch.nn.functional.linear(x, w, b)


def _grads(layer, x, fn):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    y = fn(layer, x)
    y.backward(torch.randn_like(y))
    out = [y.detach(), x.grad] + [p.grad.clone() for p in (layer.scale_in, layer.scale_out, layer.bias_shift)]
    layer.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("groups,bias", [(1, True), (3, True), (1, False)])
def test_recomputing_backward_equals_reference_formulation(groups, bias):
    """The custom autograd function gives the reference's outputs and all gradients (fp32 tolerance),
    and passes torch's numerical gradcheck in float64."""
    layer = RLRRLinear(_linear(out_f=48, in_f=40, bias=bias), in_groups=groups)
    with torch.no_grad():
        layer.bias_shift.normal_()
    x = torch.randn(4, 9, 40)
    ours, ref = _grads(layer, x, lambda m, t: m(t)), _grads(layer, x, _reference_forward)
    for a, b, name in zip(ours, ref, ("y", "dx", "ds_in", "ds_out", "df")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    small = RLRRLinear(_linear(out_f=6, in_f=5, bias=bias), in_groups=groups).double()
    xd = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, *ps: small(t), (xd, small.scale_in, small.scale_out, small.bias_shift))


def test_recomputing_backward_under_bf16_autocast_matches_reference():
    layer = RLRRLinear(_linear(out_f=64, in_f=32))
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _grads(layer, x, lambda m, t: m(t))
        ref = _grads(layer, x, _reference_forward)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.float32
    for a, b, name in zip(ours, ref, ("y", "dx", "ds_in", "ds_out", "df")):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


def test_bf16_stored_weight_equals_its_fp32_copy_bit_for_bit():
    """train.frozen_dtype = bf16: a bf16-stored base weight gives exactly the outputs and gradients of
    the same (bf16-rounded) values stored in fp32, under bf16 autocast: W' and dW' * W are still
    formed in fp32, and the scale gradients stay fp32."""
    from rlrr.model import store_frozen_weights_in
    base = _linear(out_f=96, in_f=40)
    with torch.no_grad():
        base.weight.copy_(base.weight.bfloat16().float())
    wide = RLRRLinear(base, in_groups=3)
    narrow = RLRRLinear(_linear(out_f=96, in_f=40), in_groups=3)
    narrow.load_state_dict(wide.state_dict())
    assert store_frozen_weights_in(narrow, torch.bfloat16) == 96 * 40 * 2
    assert narrow.weight.dtype == torch.bfloat16 and narrow.scale_in.dtype == torch.float32
    x = torch.randn(4, 9, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = _grads(narrow, x, lambda m, t: m(t)), _grads(wide, x, lambda m, t: m(t))
    assert [t.dtype for t in ours[2:]] == [torch.float32] * 3
    for a, b, name in zip(ours, ref, ("y", "dx", "ds_in", "ds_out", "df")):
        assert torch.equal(a, b), name


def test_no_rescaled_weight_is_kept_for_backward():
    """Between forward and backward the layer stores its input and its own parameters only: no
    (out, in) W' or factor tensor (the reference keeps two per layer)."""
    layer = RLRRLinear(_linear(out_f=96, in_f=80))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 80, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    big = [t for t in saved if t.numel() >= 96 * 80]
    assert big and all(t.data_ptr() == layer.weight.data_ptr() for t in big), [tuple(t.shape) for t in big]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _reference_forward(layer, x).sum().backward()
    assert sum(t.numel() == 96 * 80 and t.data_ptr() != layer.weight.data_ptr() for t in saved) >= 1


@pytest.mark.parametrize("groups,rank", [(1, 1), (3, 1), (3, 2)])
def test_compiled_layers_keep_no_rescaled_weight_for_backward(groups, rank):
    """Compiled, too: inductor's pipeline under bf16 autocast (its partitioner, which merges equal parts of the
    forward and the backward and then picks what to keep) keeps the inputs and the layers' own tensors. The
    backward rebuilds W' from W: had the two W' been merged into one node, the partitioner would keep the
    first layer's bf16 W' (a weight's worth of memory per layer; the last layer's it rebuilt either way)."""
    from tests.helpers import tool_module

    out_f, in_f = 96, 80
    torch.manual_seed(0)
    net = nn.Sequential(RLRRLinear(nn.Linear(in_f, out_f), in_groups=groups, rank=rank), nn.GELU(),
                        RLRRLinear(nn.Linear(out_f, in_f)))
    x = torch.randn(2, 5, in_f, requires_grad=True)
    tool = tool_module("inductor_kernels.py")
    graphs = {kind: gm for kind, gm, _ in tool.training_graphs(net, x, torch.bfloat16)}
    saved = tool.saved_nodes(graphs["backward"])
    weights = [(n.name, str(n.meta["val"].dtype)) for n in saved if n.meta["val"].numel() >= out_f * in_f]
    assert len(weights) == 2 and all(name.startswith("primals") for name, _ in weights), weights  # the two W


def test_trainable_base_weight_is_refused():
    layer = RLRRLinear(_linear())
    layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="keeps its base weight and bias frozen"):
        layer(torch.randn(2, 8))


@pytest.mark.parametrize("norm_cls", ["torch", "timm"])
def test_scale_shift_on_layernorm_runs_fused_and_equals_norm_then_affine(norm_cls):
    """After a LayerNorm, SSF is folded into the norm's affine on the fly: same outputs and gradients
    as norm-then-scale-shift, and the normalised copy of x is not kept for backward."""
    import timm.layers
    norm = (nn.LayerNorm if norm_cls == "torch" else timm.layers.LayerNorm)(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_()
    ssf = ScaleShift(norm, 16, -1)
    x = torch.randn(3, 5, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ssf(x)
    g = torch.randn_like(y)
    y.backward(g)
    fused = [y.detach(), x.grad.clone(), ssf.ssf_scale.grad.clone(), ssf.ssf_shift.grad.clone()]
    x.grad = None
    ssf.zero_grad(set_to_none=True)
    ref_y = norm(x) * ssf.ssf_scale + ssf.ssf_shift
    ref_y.backward(g)
    for a, b, name in zip(fused, [ref_y.detach(), x.grad, ssf.ssf_scale.grad, ssf.ssf_shift.grad],
                          ("y", "dx", "dscale", "dshift")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert not any(t.shape == x.shape and t.data_ptr() != x.data_ptr() for t in saved)


def test_cpu_scratch_buffers_are_per_thread():
    """W' lives in a reused per-thread buffer on CPU: concurrent forwards must not see each other's."""
    import threading
    layers = [RLRRLinear(_linear(out_f=64, in_f=48, seed=s)) for s in range(2)]
    # two layers of the same shape share one buffer per thread
    xs = [torch.randn(200, 48) for _ in range(2)]
    expected = [_reference_forward(layer, x).detach() for layer, x in zip(layers, xs)]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(50):
                out = layers[i](xs[i])
                torch.testing.assert_close(out.detach(), expected[i], rtol=1e-5, atol=1e-5)
            results[i] = True
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {0: True, 1: True}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_adapted_vit_compiles_into_one_graph_with_the_same_gradients(checkpointing):
    """torch.compile (train.compile, compile_scope model) traces the custom autograd function in one graph
    (fullgraph=True raises at a graph break), timm's activation checkpointing inside it (the path that keeps
    CUDA graphs with checkpointing), and the compiled model (AOTAutograd, the path inductor uses) gives the
    eager outputs and gradients."""
    import timm

    from rlrr import apply_rlrr
    torch._dynamo.reset()
    torch.manual_seed(0)
    # two blocks: every block is traced alike, and tracing time grows with depth
    model = apply_rlrr(timm.create_model("test_vit", num_classes=4, img_size=32, depth=2))
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 3, 32, 32)
    results = []
    for net in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        y = net(x)
        y.square().sum().backward()
        results.append([y.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad(set_to_none=True)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups,rank,form,sides", [(1, 1, "residual", "both"), (3, 1, "residual", "both"),
                                                    (3, 2, "plain", "both"), (1, 3, "additive", "both"),
                                                    (1, 1, "residual", "out"), (3, 1, "plain", "in")])
def test_compiled_layer_is_one_matmul_forward_and_two_backward_with_the_eager_gradients(groups, rank, form, sides):
    """What inductor receives for a compiled RLRRLinear (AOTAutograd's graphs, here run by aten): the forward
    matmul, dX and dW' are its only matrix products. D at rank r and dS_out, dS_in are sums of products that
    inductor folds into its passes over W and dW' (as batched products they would be written out in fp32 and
    read back). In float64 the gradients equal the eager layer's up to the summation order: n-term sums,
    n*eps64 times the same sums over absolute values."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from rlrr.layers import rescaled_weight, scale_views

    graphs = {}

    def keep(kind):
        def compiler(gm, _):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    torch.manual_seed(0)
    out, inn, tokens = 24, 20, 10
    layer = RLRRLinear(nn.Linear(inn, out), in_groups=groups, rank=rank, sides=sides, form=form).double()
    x, grad_y = torch.randn(2, tokens // 2, inn, dtype=torch.float64), torch.randn(2, tokens // 2, out,
                                                                                    dtype=torch.float64)
    results = []
    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    for net in (layer, torch.compile(layer, backend=backend, fullgraph=True)):
        xi = x.clone().requires_grad_(True)
        y = net(xi)
        y.backward(grad_y)
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), xi.grad, grads))
        layer.zero_grad(set_to_none=True)
    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.baddbmm.default}
    for kind, count in (("forward", 1), ("backward", 2)):
        targets = [n.target for n in graphs[kind].graph.nodes if n.op == "call_function"]
        assert sum(t in products for t in targets) == count, (kind, [t for t in targets if t in products])
        assert torch.ops.aten.bmm.default not in targets, kind

    (y_e, dx_e, g_e), (y_c, dx_c, g_c) = results
    eps = torch.finfo(torch.float64).eps
    w, b = layer.weight.detach().abs(), layer.bias.detach().abs() + layer.bias_shift.detach().abs()
    s_in, s_out = (t.detach().abs() for t in (layer.scale_in, layer.scale_out))
    w_mag = rescaled_weight(w, s_in, s_out, form=form)  # |W'| bounded over absolute values
    x_2d, dy = x.reshape(-1, inn).abs(), grad_y.reshape(-1, out).abs()
    assert ((y_c - y_e).abs() <= (inn + rank + 3) * eps * (x.abs() @ w_mag.T + b)).all()
    assert ((dx_c - dx_e).abs() <= (out + rank + 3) * eps * (grad_y.abs() @ w_mag)).all()
    g = (dy.t() @ x_2d) * (1.0 if form == "additive" else w)  # |dW'| |W| over absolute values
    si, so = scale_views(s_in, s_out)
    g = g.view(groups, -1, inn)
    magnitude = {"scale_in": torch.bmm(so.transpose(1, 2), g).view(s_in.shape),
                 "scale_out": torch.bmm(g, si.transpose(1, 2)).view(s_out.shape)}
    terms = {"scale_in": out // groups, "scale_out": inn}
    assert g_e.keys() == g_c.keys() >= {"bias_shift"} and len(g_e) == 1 + (sides != "out") + (sides != "in")
    for name in g_e:
        if name == "bias_shift":
            assert ((g_c[name] - g_e[name]).abs() <= tokens * eps * dy.sum(0)).all()
            continue
        bound = (terms[name] + tokens + 3) * eps * magnitude[name]  # dW' (tokens terms), dW' * W, the n-term sum
        assert ((g_c[name] - g_e[name]).abs() <= bound).all(), name


def test_a_compiled_layer_under_autocast_is_one_graph_when_dynamo_cannot_trace_the_autocast_queries(monkeypatch):
    """torch 2.11's dynamo does not trace torch.amp.is_autocast_available: a layer that asked it while traced
    split every block at every RLRR layer, and the code between the pieces ran eagerly (the compiled step at
    half eager RLRR's speed on an H200). A query dynamo refuses to trace stands in for it here; fullgraph
    fails at any break."""
    monkeypatch.setattr(torch.amp, "is_autocast_available", torch.compiler.disable(torch.amp.is_autocast_available))
    torch._dynamo.reset()
    layer = RLRRLinear(nn.Linear(16, 12), in_groups=1)
    x = torch.randn(2, 3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.compile(layer, backend="eager", fullgraph=True)(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad is not None and layer.scale_in.grad is not None
    torch._dynamo.reset()


def test_a_layer_on_the_meta_device_gives_shapes_and_gradient_flags():
    """Shapes only, as when a model is traced or initialised on the meta device, which has no autocast."""
    layer = RLRRLinear(nn.Linear(8, 6), in_groups=1).to("meta")
    y = layer(torch.zeros(3, 5, 8, device="meta"))
    assert y.shape == (3, 5, 6) and y.device.type == "meta" and y.requires_grad
