"""ScaleShift: SSF's per-channel ``base(x) * scale + shift`` after a frozen module (docs/method.md,
section 2), calling its base module's own forward as peft's layers do, and its exact merge."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .scales import check_finite
from .variants import Init


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


    @torch.no_grad()
    def merged(self) -> nn.Module:
        """Fold SSF into its base: a LayerNorm affine, or a linear's or conv's output rows (fp32, cast once)."""
        base = self.base
        gamma, beta = self.ssf_scale.float(), self.ssf_shift.float()
        if isinstance(base, nn.LayerNorm):
            if base.weight is None or base.bias is None:
                raise ValueError("cannot fold SSF into a LayerNorm without elementwise affine weight and bias")
            weight, bias = base.weight.float() * gamma, base.bias.float() * gamma + beta
        elif type(base) is nn.Linear and self.channel_dim in (-1,):
            if base.bias is None:
                raise ValueError("cannot fold SSF into a bias-free Linear")
            weight = base.weight.float() * gamma.view(-1, 1)
            bias = base.bias.float() * gamma + beta
        elif isinstance(base, nn.Conv2d) and self.channel_dim == 1:
            if base.bias is None:
                raise ValueError("cannot fold SSF into a bias-free Conv2d")
            weight = base.weight.float() * gamma.view(-1, 1, 1, 1)
            bias = base.bias.float() * gamma + beta
        else:
            raise TypeError(f"cannot fold SSF into {type(base).__name__}")
        check_finite(weight, bias)
        base.weight.copy_(weight)
        base.bias.copy_(bias)
        return base


def _is_plain_affine_layer_norm(module: nn.Module) -> bool:
    """nn.LayerNorm or timm's LayerNorm on the last dim with weight and bias, without timm's fast-norm
    kernels (LayerNorm2d and other subclasses that permute or re-implement stay on the generic path)."""
    from timm.layers import LayerNorm as TimmLayerNorm
    return (type(module) in (nn.LayerNorm, TimmLayerNorm) and not getattr(module, "_fast_norm", False)
            and module.weight is not None and module.bias is not None)
