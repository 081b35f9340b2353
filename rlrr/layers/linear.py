"""RLRRLinear: a frozen nn.Linear rescaled as W' = W * (1 + S_out S_in) with a bias shift
(docs/method.md, section 1), its autograd function and its exact merge.

RLRRLinear owns the frozen weight and bias of the nn.Linear it replaces (same Parameter objects,
same names), so DeepSpeed ZeRO-3 gathers them around this module's own forward.

Training cost: the scale gradients need dW' (the same matmul as full fine-tuning's weight
gradient), but nothing needs W' kept between forward and backward. ``RescaledLinearFn`` builds W'
in forward, uses it and drops it, rebuilds it in backward for dX, and reduces dW' * W to the two
scale vectors, so each layer holds at most one (out, in) temporary at a time and stores only its
(compute-dtype) input, like a frozen nn.Linear. On CUDA those passes are Triton kernels (fused.py).
"""
import contextlib
import functools
import importlib.util
import threading
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .scales import check_finite, init_scales, rescale_dtype, rescaled_weight, scale_shapes, scale_views
from .variants import Form, Init, Kernel, Sides, check_variant


class RLRRLinear(nn.Module):
    """A frozen nn.Linear rescaled by W * (1 + S_out S_in) with a trainable bias shift.

    ``in_groups`` > 1 gives each contiguous chunk of output rows its own input-side vector:
    ``in_groups=3`` on timm's fused ``attn.qkv`` equals separate q, k and v layers, as in the
    official ViT code. ``rank``, ``sides`` and ``form`` select the paper's ablations (module docstring).
    """

    def __init__(self, base: nn.Linear, in_groups: int = 1, init: Init = "official", rank: int = 1,
                 sides: Sides = "both", form: Form = "residual", kernel: Kernel = "auto"):
        super().__init__()
        if type(base) is not nn.Linear:
            raise TypeError(f"RLRRLinear wraps a plain nn.Linear, got {type(base).__name__}")
        out_features, in_features = base.weight.shape
        if out_features % in_groups:
            raise ValueError(f"out_features={out_features} is not divisible by in_groups={in_groups}")
        check_variant(rank, sides)
        self.in_features, self.out_features, self.in_groups = in_features, out_features, in_groups
        self.rank, self.sides, self.form, self.kernel = rank, sides, form, kernel
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dd = dict(device=base.weight.device, dtype=base.weight.dtype)
        shape_in, shape_out = scale_shapes(out_features, in_features, in_groups, rank)
        self.scale_in = nn.Parameter(torch.empty(shape_in, **dd), requires_grad=sides != "out")
        self.scale_out = nn.Parameter(torch.empty(shape_out, **dd), requires_grad=sides != "in")
        self.bias_shift = nn.Parameter(torch.empty(out_features, **dd))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: Init = "official") -> None:
        init_scales(self.scale_in, self.scale_out, init, self.form, self.sides)
        nn.init.zeros_(self.bias_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RescaledLinearFn.apply(x, self.weight, self.bias, self.scale_in, self.scale_out, self.bias_shift,
                                      self.form, use_fused(self.kernel, x))

    def extra_repr(self) -> str:
        variant = "" if (self.rank, self.sides, self.form) == (1, "both", "residual") else \
            f", rank={self.rank}, sides={self.sides}, form={self.form}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, in_groups={self.in_groups}{variant}")

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear equal to ``self``, computed in fp32 and cast back once.

        A bias-free base (Swin's patch-merging reduction) gets a bias from the shift; the caller decides
        whether it may keep it (see ``fold_bias_into_preceding_norm``).
        """
        w32 = rescaled_weight(self.weight.float(), self.scale_in.float(), self.scale_out.float(), form=self.form)
        b32 = self.bias_shift.float() if self.bias is None else self.bias.float() + self.bias_shift.float()
        check_finite(w32, b32)
        out = nn.Linear(self.in_features, self.out_features, bias=True,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(w32)
        out.bias.copy_(b32)
        return out


_scratch = threading.local()


def _cpu_scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """A reusable (shape, dtype) buffer, one per thread, on CPU only.

    W' and dW' are (out, in) temporaries made and dropped for every layer in every step; on CPU
    each fresh allocation of that size costs page faults and fragments the heap (docs/benchmarks.md).
    CUDA's caching allocator already reuses blocks.
    Per thread because forward and backward may run on different threads (autograd's engine).
    """
    if device.type != "cpu" or torch.compiler.is_compiling():  # compiled graphs plan their own buffers
        return None
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (tuple(shape), dtype)
    if key not in buffers:
        buffers[key] = torch.empty(shape, dtype=dtype)
    return buffers[key]


def _autocast_on(device_type: str) -> bool:
    # Devices without autocast (meta: shapes only) have no autocast state to ask for. Not asked while
    # torch.compile traces: torch 2.11's dynamo breaks the graph at is_autocast_available (every RLRR layer
    # split its block in three, seen on an H200), and compiled code runs on real devices.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast a linear runs in the autocast dtype; F.linear would cast x and W' itself.
    device_type = x.device.type
    if _autocast_on(device_type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class RescaledLinearFn(torch.autograd.Function):
    """y = x W'^T + b + f with W' = W * (1 + S_out S_in) (or another ``form``), recomputing W' in backward.

    Gradients (G = dD = dW' * W, or dW' itself for the additive form, viewed as (groups, out/groups, in)):
      dS_out[g] = G[g] S_in[g]^T        dS_in[g] = S_out[g]^T G[g]
    as two batched matrix products (matrix-vector at rank 1); df = sum of dy over tokens. W and b
    get no gradient. ``fused``: the passes around the matmuls run as Triton kernels (fused.py).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale_in, scale_out, bias_shift, form="residual", fused=False):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("RLRRLinear keeps its base weight and bias frozen; set requires_grad=False on them")
        dtype = _compute_dtype(x)
        b = bias_shift if bias is None else bias + bias_shift
        x_c = x if x.dtype == dtype else x.to(dtype)  # x itself, not an alias of it (torch.compile)
        w_prime = _weight_in(dtype, weight, scale_in, scale_out, form, fused)
        device_type = x.device.type
        with torch.autocast(device_type, enabled=False) if _autocast_on(device_type) else contextlib.nullcontext():
            y = F.linear(x_c, w_prime, b.to(dtype))
        ctx.save_for_backward(x_c, weight, scale_in, scale_out)
        ctx.x_dtype, ctx.form, ctx.fused = x.dtype, form, fused
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_c, weight, scale_in, scale_out = ctx.saved_tensors
        dtype = x_c.dtype
        grad_y = grad_y.to(dtype)
        grad_x = grad_s_in = grad_s_out = grad_f = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ _weight_in(dtype, weight, scale_in, scale_out, ctx.form, ctx.fused, rebuild=True)
                      ).to(ctx.x_dtype)
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        need_in, need_out = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        if need_in or need_out:
            x_2d = x_c.reshape(-1, weight.shape[1])
            if ctx.fused:
                from . import fused
                grad_s_in, grad_s_out = fused.scale_grads(dy.t() @ x_2d, weight, scale_in, scale_out, ctx.form,
                                                          need_in, need_out)
            else:
                grad_s_in, grad_s_out = _scale_grads(dy, x_2d, weight, scale_in, scale_out, ctx.form, need_in,
                                                     need_out)
        if ctx.needs_input_grad[5]:
            grad_f = dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(scale_out.dtype)
        return grad_x, None, None, grad_s_in, grad_s_out, grad_f, None, None


def _weight_in(dtype: torch.dtype, weight, scale_in, scale_out, form: Form, fused: bool,
               rebuild: bool = False) -> torch.Tensor:
    """W' in the compute dtype: one Triton pass (fused), or the reference's passes into a CPU scratch;
    ``rebuild``: the backward's (rescaled_weight)."""
    if fused:
        from . import fused as kernels
        return kernels.rescaled_weight(weight, scale_in, scale_out, form, dtype)
    scratch = _cpu_scratch(weight.shape, rescale_dtype(weight, scale_in), weight.device)
    return rescaled_weight(weight, scale_in, scale_out, out=scratch, form=form, rebuild=rebuild).to(dtype)


def _scale_grads(dy, x_2d, weight, scale_in, scale_out, form: Form, need_in: bool, need_out: bool):
    """(dS_in, dS_out) from dW' = dy^T x with torch's ops: dW' * W in the scratch, then two batched products.

    Traced by torch.compile, two sums of products instead: inductor folds the cast and dW' * W into each
    reduction, so dW' and W are read twice and no (out, in) tensor is written; a batched product is a
    library call whose input, dW' * W in fp32, would be written out and read back by each product."""
    g_dtype = rescale_dtype(weight, scale_in)
    s_in, s_out = scale_views(scale_in, scale_out)
    groups, _, in_features = s_in.shape
    if torch.compiler.is_compiling():
        g = (dy.t() @ x_2d).to(g_dtype)
        g = (g if form == "additive" else g * weight).view(groups, -1, 1, in_features)  # (groups, rows, 1, in)
        grad_s_out = (g * s_in.unsqueeze(1).to(g_dtype)).sum(-1).view(scale_out.shape).to(scale_out.dtype) \
            if need_out else None
        grad_s_in = (g * s_out.unsqueeze(-1).to(g_dtype)).sum(1).view(scale_in.shape).to(scale_in.dtype) \
            if need_in else None
        return grad_s_in, grad_s_out
    scratch = _cpu_scratch(weight.shape, g_dtype, weight.device)  # held W' a moment ago
    g = torch.mm(dy.t(), x_2d, out=scratch if dy.dtype == g_dtype else None).to(g_dtype)
    if form != "additive":
        g.mul_(weight)  # dD = dW' * W
    g = g.view(groups, -1, in_features)
    grad_s_in = grad_s_out = None
    if need_out:
        grad_s_out = torch.bmm(g, s_in.transpose(1, 2).to(g_dtype)).view(scale_out.shape).to(scale_out.dtype)
    if need_in:
        grad_s_in = torch.bmm(s_out.transpose(1, 2).to(g_dtype), g).view(scale_in.shape).to(scale_in.dtype)
    return grad_s_in, grad_s_out


def use_fused(kernel: Kernel, x: torch.Tensor) -> bool:
    """Whether RLRRLinear runs its Triton kernels: "auto" on CUDA when Triton is installed, never while
    torch.compile traces (inductor fuses the formula itself), "triton" always otherwise."""
    if kernel == "torch" or torch.compiler.is_compiling():
        return False
    return kernel == "triton" or (x.is_cuda and _triton_installed())


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@torch.no_grad()
def fold_bias_into_preceding_norm(linear: nn.Linear, norm: nn.LayerNorm) -> nn.Linear:
    """Turn ``linear(norm(x))`` with a bias into an equal bias-free linear by shifting the norm's bias.

    The norm's output feeds only this linear (Swin patch merging), and W (out x in, out < in) has
    full row rank, so W delta = b has an exact solution: norm.bias += delta removes b. Solved in
    float64; refuses to go on if the residual is not negligible.
    """
    w = linear.weight.double()
    b = linear.bias.double()
    delta = torch.linalg.lstsq(w.cpu(), b.cpu().unsqueeze(1), driver="gelsd").solution.squeeze(1).to(w.device)
    residual = (w @ delta - b).abs().max().item()
    if residual > 1e-6 * max(1.0, b.abs().max().item()):
        raise ValueError(f"cannot fold the bias shift into the preceding norm (residual {residual:.3g}); "
                         "the merged weight is rank-deficient")
    norm.bias.copy_(norm.bias.double() + delta)
    out = nn.Linear(linear.in_features, linear.out_features, bias=False,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight)
    return out
