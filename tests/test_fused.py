"""rlrr/layers/fused.py (the Triton path of RLRRLinear) against the reference formula, on CPU through Triton's
interpreter: every form, rank, side, qkv grouping, storage and compute dtype.

Tolerances are worst-case rounding bounds, not fitted numbers: a result computed with n roundings
in a precision with unit eps differs from the exact one by at most n * eps times the same
computation done on absolute values; a value cast once to a narrower dtype moves by less than one
ulp, eps * |value| (half that on the GPU, which rounds to nearest; Triton's interpreter truncates).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from rlrr.layers import RLRRLinear, rescaled_weight, scale_views

from helpers import ROOT

pytest.importorskip("triton", reason="Triton ships with torch's CUDA builds; the CPU-only wheel has none")
EPS32 = torch.finfo(torch.float32).eps
# the kernels' device: the GPU when one is there and the interpreter is off (TRITON_INTERPRET=0 python -m pytest
# tests/test_fused.py, as tools/gpu_acceptance.sh runs it), else the CPU through Triton's interpreter
DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")

# (groups, rank, form, out, in): out and in not multiples of the tiles; 3 groups is the qkv layer
SHAPES = [(1, 1, "residual", 40, 150), (3, 1, "residual", 96, 70), (3, 2, "plain", 72, 33),
          (1, 3, "additive", 33, 260), (3, 1, "plain", 36, 129), (1, 2, "residual", 70, 40)]


@pytest.fixture(scope="module")
def kernels():
    """rlrr.layers.fused, its kernels run on DEVICE (on CPU by Triton's interpreter: tests/conftest.py sets
    TRITON_INTERPRET=1 unless the environment already says otherwise)."""
    assert DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    from rlrr.layers import fused
    return fused


def _scales(groups, rank, out, inn, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_in = torch.randn((groups, inn) if rank == 1 else (groups, rank, inn), generator=g)
    s_out = torch.randn((out,) if rank == 1 else (out, rank), generator=g)
    return s_in, s_out


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,rank,form,out,inn", SHAPES)
def test_rescaled_weight_matches_the_formula(kernels, groups, rank, form, out, inn, storage, out_dtype):
    w = torch.randn(out, inn).to(storage)
    s_in, s_out = _scales(groups, rank, out, inn)
    exact = rescaled_weight(w.double(), s_in.double(), s_out.double(), form=form)
    magnitude = rescaled_weight(w.double().abs(), s_in.double().abs(), s_out.double().abs(), form=form)
    got = kernels.rescaled_weight(w.to(DEVICE), s_in.to(DEVICE), s_out.to(DEVICE), form, out_dtype).cpu()
    assert got.dtype == out_dtype and got.shape == w.shape
    # fp32 arithmetic (rank products, rank-1 sums, the form's multiply-add), then one cast to out_dtype
    bound = (rank + 2) * EPS32 * magnitude + torch.finfo(out_dtype).eps * exact.abs()
    assert ((got.double() - exact).abs() <= bound).all()


def _exact_scale_grads(grad_w, w, s_in, s_out, form, magnitude=False):
    f = (lambda t: t.double().abs()) if magnitude else (lambda t: t.double())
    g = f(grad_w) * (f(w) if form != "additive" else 1.0)
    si, so = scale_views(f(s_in), f(s_out))
    g = g.view(si.shape[0], -1, si.shape[-1])
    return (torch.bmm(so.transpose(1, 2), g).view(s_in.shape), torch.bmm(g, si.transpose(1, 2)).view(s_out.shape))


@pytest.mark.parametrize("splits", [1, 2, 0])
@pytest.mark.parametrize("groups,rank,form,out,inn,sides", [  # one-sided scales are rank 1 (the layer's rule)
    (*shape, sides) for shape in SHAPES for sides in ("both", "out", "in") if sides == "both" or shape[1] == 1])
def test_scale_grads_match_the_formula(kernels, groups, rank, form, out, inn, sides, splits):
    grad_w = torch.randn(out, inn).bfloat16()  # dW' as the bf16 matmul leaves it
    w = torch.randn(out, inn)
    s_in, s_out = _scales(groups, rank, out, inn, seed=1)
    need_in, need_out = sides != "out", sides != "in"
    got_in, got_out = kernels.scale_grads(grad_w.to(DEVICE), w.to(DEVICE), s_in.to(DEVICE), s_out.to(DEVICE), form,
                                          need_in, need_out, splits=splits)
    got_in, got_out = (None if t is None else t.cpu() for t in (got_in, got_out))
    exact = _exact_scale_grads(grad_w, w, s_in, s_out, form)
    magnitude = _exact_scale_grads(grad_w, w, s_in, s_out, form, magnitude=True)
    for name, got, need, want, size, n in (("dS_in", got_in, need_in, exact[0], magnitude[0], out // groups),
                                           ("dS_out", got_out, need_out, exact[1], magnitude[1], inn)):
        if not need:
            assert got is None, name
            continue
        assert got.shape == want.shape and got.dtype == torch.float32, name
        assert ((got.double() - want).abs() <= (n + 2) * EPS32 * size).all(), name  # n-term fp32 sums + dD


def _layer_pair(groups, rank, form, sides, out=48, inn=40):
    """The same adapted layer twice: on torch's ops and on the Triton kernels."""
    torch.manual_seed(0)
    source = RLRRLinear(nn.Linear(inn, out), in_groups=groups, rank=rank, sides=sides, form=form)
    with torch.no_grad():
        source.bias_shift.normal_()
    layers = []
    for kernel in ("torch", "triton"):
        layer = RLRRLinear(nn.Linear(inn, out), in_groups=groups, rank=rank, sides=sides, form=form, kernel=kernel)
        layer.load_state_dict(source.state_dict())
        layers.append(layer.to(DEVICE))
    return layers


@pytest.mark.parametrize("groups,rank,form,sides", [(3, 1, "residual", "both"), (1, 2, "plain", "both"),
                                                    (3, 1, "additive", "out"), (1, 1, "residual", "in")])
def test_fused_layer_trains_like_the_reference_under_bf16_autocast(kernels, groups, rank, form, sides):
    """Forward and backward of the whole layer, as training runs it: both paths build the same bf16 W'
    (up to one bf16 ulp where fp32 roundings differ) and run the same bf16 matmuls."""
    reference, fused = _layer_pair(groups, rank, form, sides)
    x = torch.randn(2, 5, 40)
    grad_y = torch.randn(2, 5, 48)
    results = []
    for layer in (reference, fused):
        xi = x.to(DEVICE).requires_grad_(True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y = layer(xi)
        y.backward(grad_y.to(DEVICE, y.dtype))
        results.append((y.float().cpu(), xi.grad.cpu(),
                        {n: p.grad.cpu() for n, p in layer.named_parameters() if p.requires_grad}))
    (y_ref, dx_ref, g_ref), (y_fused, dx_fused, g_fused) = results
    assert g_ref.keys() == g_fused.keys() and g_ref  # the same trainable vectors got gradients
    w, s_in, s_out = (t.detach().cpu() for t in (reference.weight, reference.scale_in, reference.scale_out))
    w_prime = rescaled_weight(w.double().abs(), s_in.double().abs(), s_out.double().abs(), form=form)
    ulp = torch.finfo(torch.bfloat16).eps
    # one bf16 ulp in W' moves y and dx by at most ulp * |x| |W'|^T (and the output rounding, once more)
    y_bound = 2 * ulp * (x.double().abs() @ w_prime.T + y_ref.double().abs())
    assert ((y_fused.double() - y_ref.double()).abs() <= y_bound).all()
    dx_bound = 2 * ulp * (grad_y.double().abs() @ w_prime + dx_ref.double().abs())
    assert ((dx_fused.double() - dx_ref.double()).abs() <= dx_bound).all()
    # the scale gradients read the same bf16 dW': only the fp32 summation order differs
    dw = grad_y.reshape(-1, 48).bfloat16().t().double().abs() @ x.reshape(-1, 40).bfloat16().double().abs()
    bounds = _exact_scale_grads(dw, w, s_in, s_out, form, magnitude=True)
    for name, bound, n in (("scale_in", bounds[0], 48 // groups), ("scale_out", bounds[1], 40)):
        if name in g_ref:
            assert ((g_fused[name].double() - g_ref[name].double()).abs() <= (n + 3) * EPS32 * bound).all(), name
    torch.testing.assert_close(g_fused["bias_shift"], g_ref["bias_shift"], rtol=0, atol=0)  # the same sum


def test_kernel_choice():
    """auto: Triton on CUDA only; torch always on CPU tensors; an explicit choice is honoured."""
    from rlrr.layers import use_fused
    cpu = torch.zeros(1)
    assert not use_fused("auto", cpu) and not use_fused("torch", cpu) and use_fused("triton", cpu)


def test_triton_kernel_on_cpu_without_the_interpreter_is_one_line(kernels, monkeypatch):
    """What a run sees where the kernels cannot run: one line (train.py then falls back to torch's ops)."""
    assert kernels.unavailable(DEVICE) is None  # they run here (on CPU: through the interpreter)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="model.kernel = triton needs a CUDA device, got cpu"):
        kernels.check_device(torch.zeros(1))
    assert kernels.unavailable(torch.device("cpu")).startswith("RuntimeError: model.kernel = triton needs a CUDA")


def _compile_kernels(tmp_path, *args, code=None):
    """tools/compile_kernels.py in a fresh interpreter without the interpreter switch (the kernels must be
    Triton's JIT functions) and with an empty Triton cache (each variant is built, not read back)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    tool = str(ROOT / "tools" / "compile_kernels.py")
    command = [sys.executable, tool, *args] if code is None else [sys.executable, "-c", code, tool, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.integration
def test_every_variant_the_layers_launch_builds_for_ampere_and_hopper(tmp_path):
    """The interpreter never builds a kernel: Triton's compiler does, here down to a cubin for sm_80 and sm_90,
    for every variant an RLRR layer's training step launches (specialised as a launch on the GPU would be)."""
    res = _compile_kernels(tmp_path, "--arch", "80,90", "--json", tmp_path / "k.json")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "k.json").read_text())
    assert not [r for r in rows if "error" in r]
    variants = {r["variant"] for r in rows}
    for arch in ("sm_80", "sm_90"):
        assert {r["variant"] for r in rows if r["arch"] == arch} == variants
    text = " ".join(variants)
    for part in ("FORM=0", "FORM=1", "FORM=2", "RANK=1", "RANK=3", "NEED_OUT=False", "NEED_IN=False",
                 "w=bf16", "out=fp16", "out=fp32", "gw=bf16", "gw=fp16"):
        assert part in text, part  # each form, rank, side, storage and compute dtype was launched and built
    # the training defaults at ViT's widths (multiples of 16) on Hopper: built without spilling registers
    default = [r for r in rows if r["arch"] == "sm_90" and "RANK=1," in r["variant"] and "FORM=0" in r["variant"]
               and "in_features" in r["variant"].partition("x16:")[2]]
    assert len(default) == 6 and all(r["registers"] > 0 and r["local_bytes"] == 0 for r in default)
    assert f"| sm_90 | {default[0]['variant']} | {default[0]['registers']} | 0 |" in res.stdout


@pytest.mark.integration
def test_a_variant_that_does_not_build_is_named_and_fails_the_command(tmp_path):
    """The compiler stopped for one kernel (as it would on a construct the interpreter accepts): the other
    kernel's rows still come, the failed one is named on stderr with the error, exit code 1."""
    code = ("import runpy, sys, triton; build = triton.compile\n"
            "def compile(src, **kw):\n"
            "    if src.fn.__name__ == '_scale_grad_kernel': raise ValueError('unsupported layout\\nin tile')\n"
            "    return build(src, **kw)\n"
            "triton.compile = compile; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    res = _compile_kernels(tmp_path, "--arch", "90", code=code)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "| sm_90 | _rescale_kernel(" in res.stdout and "did not build: ValueError: in tile" in res.stdout
    assert "compile_kernels: _scale_grad_kernel(gw=bf16" in res.stderr
    assert "did not build for sm_90: ValueError: in tile" in res.stderr


def test_compile_kernels_refuses_the_interpreter_and_unknown_architectures(monkeypatch):
    """One line each, exit code 2, before anything is built (an unknown architecture aborts LLVM)."""
    from helpers import run_tool_here
    res = run_tool_here("compile_kernels.py", "--arch", "90,999")
    assert res.returncode == 2
    assert res.stderr.strip() == ("compile_kernels: error: --arch '90,999': expected compute capabilities from 70 "
                                  "to 121, comma-separated, such as 80,90")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    res = run_tool_here("compile_kernels.py", "--arch", "90")
    assert res.returncode == 2 and "TRITON_INTERPRET=1 makes the kernels Python functions" in res.stderr
