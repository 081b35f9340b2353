"""The arithmetic every RLRR layer shares: the scale vectors' shapes and views, their initialisation,
W' = f(W, D) with D = S_out S_in for each ``form``, and the finiteness check of a merge."""
import math
from typing import Optional

import torch
import torch.nn as nn

from .variants import Form, Init, Sides


def scale_shapes(out_features: int, in_features: int, groups: int, rank: int) -> tuple[tuple, tuple]:
    """(s_in, s_out) parameter shapes: rank 1 keeps the vectors' own shapes (and the adapter files of
    the method); rank r adds an r axis."""
    if rank == 1:
        return (groups, in_features), (out_features,)
    return (groups, rank, in_features), (out_features, rank)


def scale_views(scale_in: torch.Tensor, scale_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s_in as (groups, r, in) and s_out as (groups, out/groups, r), both views."""
    groups, in_features = scale_in.shape[0], scale_in.shape[-1]
    rank = 1 if scale_in.dim() == 2 else scale_in.shape[1]
    return scale_in.view(groups, rank, in_features), scale_out.view(groups, -1, rank)


@torch.no_grad()
def init_scales(scale_in: nn.Parameter, scale_out: nn.Parameter, init: Init, form: Form, sides: Sides) -> None:
    """The reference's kaiming-uniform bounds (fan_in = in for s_in, r for S_out: rank 1 gives sqrt(6/in)
    and sqrt(6), and rank r the same spread of S_out S_in); "identity" makes W' = W at step 0 with a
    gradient for every trainable vector; a side that does not train is ones."""
    s_in, s_out = scale_views(scale_in, scale_out)
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


def rescaled_weight(weight: torch.Tensor, scale_in: torch.Tensor, scale_out: torch.Tensor,
                    out: Optional[torch.Tensor] = None, form: Form = "residual", rebuild: bool = False) -> torch.Tensor:
    """W' from W and D = S_out S_in (``form``) as an (out, in) tensor (new, or written into ``out``);
    row g of ``scale_in`` serves the g-th equal chunk of output rows. Two passes: D, then W + W * D
    in place (faster on CPU than one broadcasting addcmul). Not differentiable.

    ``rebuild``: the backward's W', with D's products written S_in first. The values are the same bit for
    bit (a product commutes exactly), but under torch.compile the graph node differs from the forward's,
    so AOTAutograd's common-subexpression pass does not merge the two W' into one node that the backward
    needs, which the partitioner would then keep from forward to backward (a bf16 copy of W' per layer,
    113 MB on ViT-B/16 at batch 64; docs/benchmarks.md). Rebuilt, W' costs one more pass over W in backward."""
    s_in, s_out = scale_views(scale_in, scale_out)
    groups, rank, in_features = s_in.shape
    w = weight.reshape(groups, -1, in_features)
    d = torch.empty(w.shape, dtype=rescale_dtype(weight, scale_in), device=w.device) if out is None \
        else out.view(w.shape)
    if rank == 1:
        torch.mul(*((s_in, s_out) if rebuild else (s_out, s_in)), out=d)
    elif torch.compiler.is_compiling():  # a sum over the ranks, which inductor folds into the W' pass
        left, right = s_out.unsqueeze(-1).to(d.dtype), s_in.unsqueeze(1).to(d.dtype)
        torch.sum(right * left if rebuild else left * right, dim=2, out=d)
    else:  # a library call: D is written out, then read by the form's pass
        torch.bmm(s_out.to(d.dtype), s_in.to(d.dtype), out=d)
    return apply_form(w, d, form, in_place=True).view(weight.shape)


def rescale_dtype(weight: torch.Tensor, scale: torch.Tensor) -> torch.dtype:
    """The dtype W' and dW' * W are computed in: the wider of the two, so bf16-stored frozen weights
    (``train.frozen_dtype``) with fp32 scales round once, not at every intermediate."""
    return torch.promote_types(weight.dtype, scale.dtype)



def apply_form(w: torch.Tensor, d: torch.Tensor, form: Form, in_place: bool = False) -> torch.Tensor:
    """W' from W and D: residual W + W * D, plain W * D, additive W + D. ``in_place`` writes it into D
    (no autograd); otherwise a new tensor, differentiable."""
    if form == "residual":
        return torch.addcmul(w, w, d, out=d) if in_place else w + w * d
    if form == "plain":
        return d.mul_(w) if in_place else w * d
    return d.add_(w) if in_place else w + d


def check_finite(*tensors: torch.Tensor) -> None:
    if not all(torch.isfinite(t).all() for t in tensors):
        raise ValueError("merge produced non-finite values; refusing to write them into the model")

