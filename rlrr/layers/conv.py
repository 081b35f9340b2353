"""RLRRConv2d: RLRR on a frozen convolution's kernel (docs/method.md, section 8) and its exact merge."""
import torch
import torch.nn as nn

from .scales import apply_form, check_finite, init_scales, rescaled_weight, scale_shapes, scale_views
from .variants import Form, Init, Sides, check_variant


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
        check_variant(rank, sides)
        self.base = base
        base.requires_grad_(False)
        self.rank, self.sides, self.form = rank, sides, form
        out_c, in_c, kh, kw = base.weight.shape
        dd = dict(device=base.weight.device, dtype=base.weight.dtype)
        shape_in, shape_out = scale_shapes(out_c * kh, in_c * kw, 1, rank)
        self.scale_in = nn.Parameter(torch.empty(shape_in, **dd), requires_grad=sides != "out")
        self.scale_out = nn.Parameter(torch.empty(shape_out, **dd), requires_grad=sides != "in")
        self.bias_shift = nn.Parameter(torch.zeros(out_c, **dd)) if base.bias is not None else None
        init_scales(self.scale_in, self.scale_out, init, form, sides)

    def rescaled_kernel(self) -> torch.Tensor:
        """W' with autograd to the scales (the merge calls rescaled_weight on the same view)."""
        w = self.base.weight
        out_c, in_c, kh, kw = w.shape
        matrix = w.permute(0, 2, 1, 3).reshape(out_c * kh, in_c * kw)
        s_in, s_out = scale_views(self.scale_in, self.scale_out)
        d = (s_out @ s_in).view_as(matrix)
        m = apply_form(matrix, d, self.form)
        return m.view(out_c, kh, in_c, kw).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.base.bias is None else self.base.bias + self.bias_shift
        return self.base._conv_forward(x, self.rescaled_kernel(), bias)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, sides={self.sides}, form={self.form}"

    @torch.no_grad()
    def merged(self) -> nn.Conv2d:
        """The base conv with W' and b + f written in (fp32, cast once); a plain nn.Conv2d."""
        base = self.base
        out_c, in_c, kh, kw = base.weight.shape
        matrix = base.weight.float().permute(0, 2, 1, 3).reshape(out_c * kh, in_c * kw)
        w32 = rescaled_weight(matrix, self.scale_in.float(), self.scale_out.float(), form=self.form)
        w32 = w32.view(out_c, kh, in_c, kw).permute(0, 2, 1, 3)
        b32 = None if base.bias is None else base.bias.float() + self.bias_shift.float()
        check_finite(w32, *([b32] if b32 is not None else []))
        base.weight.copy_(w32)
        if b32 is not None:
            base.bias.copy_(b32)
        return base
