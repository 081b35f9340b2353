"""The RLRR layers (Dong et al., CVPR 2024), each with an exact merge.

RLRRLinear:  W' = W * (1 + s_out s_in^T),  b' = b + f         (docs/method.md, section 1)
RLRRConv2d:  the same on a k x k kernel viewed as an (out*k, in*k) matrix (section 8)
ScaleShift:  y = base(x) * gamma + beta  (SSF after a norm, a linear or the patch conv; section 2)

The ablations of the paper are options of the first two (docs/method.md, section 9): rank r
(S_out: out x r, S_in: r x in), one side only (the other fixed at ones), and the form of the update:
"residual" W * (1 + S_out S_in) (the method), "plain" W * (S_out S_in) (no residual 1) and
"additive" W + S_out S_in (without W).

RLRRLinear owns the frozen weight and bias of the nn.Linear it replaces (same Parameter objects,
same names), so DeepSpeed ZeRO-3 gathers them around this module's own forward. ScaleShift calls
its base module's own forward, as peft's layers do.

Training cost: the scale gradients need dW' (the same matmul as full fine-tuning's weight
gradient), but nothing needs W' kept between forward and backward. ``RescaledLinearFn`` builds W'
in forward, uses it and drops it, rebuilds it in backward for dX, and reduces dW' * W to the two
scale vectors in place, so each layer holds at most one (out, in) temporary at a time and stores
only its (compute-dtype) input, like a frozen nn.Linear.
"""
import functools
import importlib.util
import math
import threading
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

Init = Literal["official", "identity"]  # the adapter's starting point: the reference's random one, or W' = W
Sides = Literal["both", "out", "in"]  # which scale vectors train (the other side is fixed at ones)
Form = Literal["residual", "plain", "additive"]  # W*(1+D) | W*D | W+D with D = S_out S_in
Kernel = Literal["auto", "triton", "torch"]  # RLRRLinear's passes around the matmuls: see use_fused


def _scale_shapes(out_features: int, in_features: int, groups: int, rank: int) -> tuple[tuple, tuple]:
    """(s_in, s_out) parameter shapes: rank 1 keeps the vectors' own shapes (and the adapter files of
    the method); rank r adds an r axis."""
    if rank == 1:
        return (groups, in_features), (out_features,)
    return (groups, rank, in_features), (out_features, rank)


def _views(scale_in: torch.Tensor, scale_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s_in as (groups, r, in) and s_out as (groups, out/groups, r), both views."""
    groups, in_features = scale_in.shape[0], scale_in.shape[-1]
    rank = 1 if scale_in.dim() == 2 else scale_in.shape[1]
    return scale_in.view(groups, rank, in_features), scale_out.view(groups, -1, rank)


@torch.no_grad()
def init_scales(scale_in: nn.Parameter, scale_out: nn.Parameter, init: Init, form: Form, sides: Sides) -> None:
    """The reference's kaiming-uniform bounds (fan_in = in for s_in, r for S_out: rank 1 gives sqrt(6/in)
    and sqrt(6), and rank r the same spread of S_out S_in); "identity" makes W' = W at step 0 with a
    gradient for every trainable vector; a side that does not train is ones."""
    s_in, s_out = _views(scale_in, scale_out)
    rank = s_in.shape[1]
    nn.init.uniform_(s_in, -math.sqrt(6.0 / s_in.shape[-1]), math.sqrt(6.0 / s_in.shape[-1]))
    nn.init.uniform_(s_out, -math.sqrt(6.0 / rank), math.sqrt(6.0 / rank))
    if sides != "both":  # a row (sides=out) or column (sides=in) scale: D = s_out 1^T or 1 s_in^T
        fixed, trained = (s_in, s_out) if sides == "out" else (s_out, s_in)
        fixed.fill_(1.0)
        if init == "identity":
            trained.fill_(1.0 if form == "plain" else 0.0)
        return
    if init == "identity":
        s_out.zero_()  # D = 0: W' = W for "residual" and "additive"
        if form == "plain":  # D = 1 needs s_out[:, 0] s_in[0] = 1; the other ranks start at zero from s_out
            s_out[:, :, 0] = 1.0
            s_in[:, 0, :] = 1.0


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
        if sides != "both" and rank != 1:
            raise ValueError(f"sides={sides!r} scales rows or columns only: rank must be 1, got {rank}")
        self.in_features, self.out_features, self.in_groups = in_features, out_features, in_groups
        self.rank, self.sides, self.form, self.kernel = rank, sides, form, kernel
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dd = dict(device=base.weight.device, dtype=base.weight.dtype)
        shape_in, shape_out = _scale_shapes(out_features, in_features, in_groups, rank)
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


def rescaled_weight(weight: torch.Tensor, scale_in: torch.Tensor, scale_out: torch.Tensor,
                    out: Optional[torch.Tensor] = None, form: Form = "residual") -> torch.Tensor:
    """W' from W and D = S_out S_in (``form``) as an (out, in) tensor (new, or written into ``out``);
    row g of ``scale_in`` serves the g-th equal chunk of output rows. Two passes: D, then W + W * D
    in place (faster on CPU than one broadcasting addcmul). Not differentiable."""
    s_in, s_out = _views(scale_in, scale_out)
    groups, rank, in_features = s_in.shape
    w = weight.reshape(groups, -1, in_features)
    d = torch.empty(w.shape, dtype=rescale_dtype(weight, scale_in), device=w.device) if out is None \
        else out.view(w.shape)
    if rank == 1:
        torch.mul(s_out, s_in, out=d)
    else:
        torch.bmm(s_out.to(d.dtype), s_in.to(d.dtype), out=d)
    if form == "residual":
        torch.addcmul(w, w, d, out=d)
    elif form == "plain":
        d.mul_(w)
    else:
        d.add_(w)
    return d.view(weight.shape)


def rescale_dtype(weight: torch.Tensor, scale: torch.Tensor) -> torch.dtype:
    """The dtype W' and dW' * W are computed in: the wider of the two, so bf16-stored frozen weights
    (``train.frozen_dtype``) with fp32 scales round once, not at every intermediate."""
    return torch.promote_types(weight.dtype, scale.dtype)


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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast a linear runs in the autocast dtype; F.linear would cast x and W' itself.
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class RescaledLinearFn(torch.autograd.Function):
    """y = x W'^T + b + f with W' = W * (1 + S_out S_in) (or another ``form``), recomputing W' in backward.

    Gradients (G = dD = dW' * W, or dW' itself for the additive form, viewed as (groups, out/groups, in)):
      dS_out[g] = G[g] S_in[g]^T        dS_in[g] = S_out[g]^T G[g]
    as two batched matrix products (matrix-vector at rank 1); df = sum of dy over tokens. W and b
    get no gradient. ``fused``: the passes around the matmuls run as Triton kernels (rlrr/fused.py).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale_in, scale_out, bias_shift, form="residual", fused=False):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("RLRRLinear keeps its base weight and bias frozen; set requires_grad=False on them")
        dtype = _compute_dtype(x)
        b = bias_shift if bias is None else bias + bias_shift
        x_c = x if x.dtype == dtype else x.to(dtype)  # x itself, not an alias of it (torch.compile)
        w_prime = _weight_in(dtype, weight, scale_in, scale_out, form, fused)
        with torch.autocast(x.device.type, enabled=False):
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
            grad_x = (grad_y @ _weight_in(dtype, weight, scale_in, scale_out, ctx.form, ctx.fused)).to(ctx.x_dtype)
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


def _weight_in(dtype: torch.dtype, weight, scale_in, scale_out, form: Form, fused: bool) -> torch.Tensor:
    """W' in the compute dtype: one Triton pass (fused), or the reference's passes into a CPU scratch."""
    if fused:
        from . import fused as kernels
        return kernels.rescaled_weight(weight, scale_in, scale_out, form, dtype)
    scratch = _cpu_scratch(weight.shape, rescale_dtype(weight, scale_in), weight.device)
    return rescaled_weight(weight, scale_in, scale_out, out=scratch, form=form).to(dtype)


def _scale_grads(dy, x_2d, weight, scale_in, scale_out, form: Form, need_in: bool, need_out: bool):
    """(dS_in, dS_out) from dW' = dy^T x with torch's ops: dW' * W in the scratch, then two batched products."""
    g_dtype = rescale_dtype(weight, scale_in)
    scratch = _cpu_scratch(weight.shape, g_dtype, weight.device)  # held W' a moment ago
    s_in, s_out = _views(scale_in, scale_out)
    groups, _, in_features = s_in.shape
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


class RLRRConv2d(nn.Module):
    """A frozen nn.Conv2d whose kernel (out, in/groups, kh, kw), viewed as the (out*kh, in/groups*kw)
    matrix of the paper's supplement (permute to (out, kh, in, kw)), is rescaled like RLRRLinear's W
    and reshaped back. The view is of the stored kernel, so grouped and depthwise convolutions are
    rescaled and merged exactly the same way. A bias shift exists only where the conv has a bias (as
    in the reference; ResNet convs have none, the BatchNorm after them keeps its own bias).

    Plain autograd: CNN kernels are small next to their activations, so W' is simply kept.
    """

    def __init__(self, base: nn.Conv2d, init: Init = "official", rank: int = 1, sides: Sides = "both",
                 form: Form = "residual"):
        super().__init__()
        if type(base) is not nn.Conv2d:
            raise TypeError(f"RLRRConv2d wraps a plain nn.Conv2d, got {type(base).__name__}")
        if sides != "both" and rank != 1:
            raise ValueError(f"sides={sides!r} scales rows or columns only: rank must be 1, got {rank}")
        self.base = base
        base.requires_grad_(False)
        self.rank, self.sides, self.form = rank, sides, form
        out_c, in_c, kh, kw = base.weight.shape
        dd = dict(device=base.weight.device, dtype=base.weight.dtype)
        shape_in, shape_out = _scale_shapes(out_c * kh, in_c * kw, 1, rank)
        self.scale_in = nn.Parameter(torch.empty(shape_in, **dd), requires_grad=sides != "out")
        self.scale_out = nn.Parameter(torch.empty(shape_out, **dd), requires_grad=sides != "in")
        self.bias_shift = nn.Parameter(torch.zeros(out_c, **dd)) if base.bias is not None else None
        init_scales(self.scale_in, self.scale_out, init, form, sides)

    def rescaled_kernel(self) -> torch.Tensor:
        """W' with autograd to the scales (the merge calls rescaled_weight on the same view)."""
        w = self.base.weight
        out_c, in_c, kh, kw = w.shape
        matrix = w.permute(0, 2, 1, 3).reshape(out_c * kh, in_c * kw)
        s_in, s_out = _views(self.scale_in, self.scale_out)
        d = (s_out @ s_in).view_as(matrix)
        m = matrix + matrix * d if self.form == "residual" else matrix * d if self.form == "plain" else matrix + d
        return m.view(out_c, kh, in_c, kw).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.base.bias is None else self.base.bias + self.bias_shift
        return self.base._conv_forward(x, self.rescaled_kernel(), bias)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, sides={self.sides}, form={self.form}"


@torch.no_grad()
def merged_conv(layer: RLRRConv2d) -> nn.Conv2d:
    """The base conv with W' and b + f written in (fp32, cast once); a plain nn.Conv2d."""
    base = layer.base
    out_c, in_c, kh, kw = base.weight.shape
    matrix = base.weight.float().permute(0, 2, 1, 3).reshape(out_c * kh, in_c * kw)
    w32 = rescaled_weight(matrix, layer.scale_in.float(), layer.scale_out.float(), form=layer.form)
    w32 = w32.view(out_c, kh, in_c, kw).permute(0, 2, 1, 3)
    b32 = None if base.bias is None else base.bias.float() + layer.bias_shift.float()
    _check_finite(w32, *([b32] if b32 is not None else []))
    base.weight.copy_(w32)
    if b32 is not None:
        base.bias.copy_(b32)
    return base


class ScaleShift(nn.Module):
    """SSF: a per-channel affine ``base(x) * scale + shift`` after a frozen module.

    ``channel_dim`` is -1 after a LayerNorm or a linear (tokens last) and 1 after the patch
    convolution (NCHW).
    """

    def __init__(self, base: nn.Module, num_channels: int, channel_dim: int = -1, init: Init = "official"):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.channel_dim = channel_dim
        dd = dict(device=next(base.parameters()).device, dtype=next(base.parameters()).dtype)
        self.ssf_scale = nn.Parameter(torch.empty(num_channels, **dd))
        self.ssf_shift = nn.Parameter(torch.empty(num_channels, **dd))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: Init = "official") -> None:
        if init == "identity":
            nn.init.ones_(self.ssf_scale)
            nn.init.zeros_(self.ssf_shift)
        else:
            nn.init.normal_(self.ssf_scale, mean=1.0, std=0.02)
            nn.init.normal_(self.ssf_shift, mean=0.0, std=0.02)

    def _per_channel(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim in (-1, ndim - 1):
            return t
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return t.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if _is_plain_affine_layer_norm(base):
            # Fold SSF into the norm's affine (exact: (x_hat w + b) g + s = x_hat (w g) + (b g + s)): one fused
            # kernel, and no normalised copy of x kept for backward. DeepSpeed ZeRO-3 gathers base's
            # parameters on this access (external parameter).
            return F.layer_norm(x, base.normalized_shape, base.weight * self.ssf_scale,
                                torch.addcmul(self.ssf_shift, base.bias, self.ssf_scale), base.eps)
        y = base(x)
        return y * self._per_channel(self.ssf_scale, y.ndim) + self._per_channel(self.ssf_shift, y.ndim)


def _is_plain_affine_layer_norm(module: nn.Module) -> bool:
    """nn.LayerNorm or timm's LayerNorm on the last dim with weight and bias, without timm's fast-norm
    kernels (LayerNorm2d and other subclasses that permute or re-implement stay on the generic path)."""
    from timm.layers import LayerNorm as TimmLayerNorm
    return (type(module) in (nn.LayerNorm, TimmLayerNorm) and not getattr(module, "_fast_norm", False)
            and module.weight is not None and module.bias is not None)


@torch.no_grad()
def merged_linear(layer: RLRRLinear) -> nn.Linear:
    """A plain nn.Linear equal to ``layer``, computed in fp32 and cast back once.

    A bias-free base (Swin's patch-merging reduction) gets a bias from the shift; the caller decides
    whether it may keep it (see ``fold_bias_into_preceding_norm``).
    """
    w32 = rescaled_weight(layer.weight.float(), layer.scale_in.float(), layer.scale_out.float(), form=layer.form)
    b32 = layer.bias_shift.float() if layer.bias is None else layer.bias.float() + layer.bias_shift.float()
    _check_finite(w32, b32)
    out = nn.Linear(layer.in_features, layer.out_features, bias=True,
                    device=layer.weight.device, dtype=layer.weight.dtype)
    out.weight.copy_(w32)
    out.bias.copy_(b32)
    return out


@torch.no_grad()
def merged_scale_shift(layer: ScaleShift) -> nn.Module:
    """Fold SSF into its base: a LayerNorm affine, or a linear's or conv's output rows (fp32, cast once)."""
    base = layer.base
    gamma, beta = layer.ssf_scale.float(), layer.ssf_shift.float()
    if isinstance(base, nn.LayerNorm):
        if base.weight is None or base.bias is None:
            raise ValueError("cannot fold SSF into a LayerNorm without elementwise affine weight and bias")
        weight, bias = base.weight.float() * gamma, base.bias.float() * gamma + beta
    elif type(base) is nn.Linear and layer.channel_dim in (-1,):
        if base.bias is None:
            raise ValueError("cannot fold SSF into a bias-free Linear")
        weight = base.weight.float() * gamma.view(-1, 1)
        bias = base.bias.float() * gamma + beta
    elif isinstance(base, nn.Conv2d) and layer.channel_dim == 1:
        if base.bias is None:
            raise ValueError("cannot fold SSF into a bias-free Conv2d")
        weight = base.weight.float() * gamma.view(-1, 1, 1, 1)
        bias = base.bias.float() * gamma + beta
    else:
        raise TypeError(f"cannot fold SSF into {type(base).__name__}")
    _check_finite(weight, bias)
    base.weight.copy_(weight)
    base.bias.copy_(bias)
    return base


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


def _check_finite(*tensors: torch.Tensor) -> None:
    if not all(torch.isfinite(t).all() for t in tensors):
        raise ValueError("merge produced non-finite values; refusing to write them into the model")
