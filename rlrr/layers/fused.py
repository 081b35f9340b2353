"""Triton kernels for RLRRLinear on CUDA: each per-layer pass around the matmuls in one kernel.

Eager PyTorch spends an RLRR step's extra time (docs/benchmarks.md, "GPU figures") in separate
memory-bound passes over every (out, in) weight: D = S_out S_in, W + W * D in fp32, a cast to the
compute dtype, and in backward dW' cast to fp32, times W, and two batched reductions. Here:

- ``rescaled_weight``: W' from W (fp32 or bf16 storage) and the scales in one pass, written
  straight in the compute dtype (the arithmetic in fp32, as the reference formula's).
- ``scale_grads``: dS_out and dS_in from dW' (the compute-dtype matmul output) and W in one pass:
  each program reads a tile of dW' and W once, reduces it along both axes, and writes small fp32
  partial sums that torch adds up afterwards (a fixed order: the result is deterministic, unlike
  atomics, so a resumed run equals an uninterrupted one bit for bit). No fp32 (out, in) copy.

Rank r and the qkv grouping (a separate input-side vector per chunk of output rows) are handled by
the grid: programs never straddle a group. Triton's interpreter (TRITON_INTERPRET=1) runs the same
kernels on CPU tensors, which is how ``make test`` checks them.
"""
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

FORMS = {"residual": 0, "plain": 1, "additive": 2}  # W*(1+D) | W*D | W+D
BLOCK_O, BLOCK_I = 32, 128  # a tile of output rows x input columns; not yet tuned on a GPU


def check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"model.kernel = triton needs a CUDA device, got {t.device.type} "
                           "(TRITON_INTERPRET=1 runs the kernels on CPU, slowly)")


@triton.jit
def _rescale_kernel(w_ptr, s_in_ptr, s_out_ptr, out_ptr, in_features, rows_per_group, tiles_per_group,
                    RANK: tl.constexpr, FORM: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    group = tl.program_id(0) // tiles_per_group
    local = (tl.program_id(0) % tiles_per_group) * BLOCK_O + tl.arange(0, BLOCK_O)
    rows = group * rows_per_group + local
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok, col_ok = local < rows_per_group, cols < in_features
    mask = row_ok[:, None] & col_ok[None, :]
    d = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for r in tl.static_range(RANK):
        s_out = tl.load(s_out_ptr + rows * RANK + r, mask=row_ok, other=0.0).to(tl.float32)
        s_in = tl.load(s_in_ptr + (group * RANK + r) * in_features + cols, mask=col_ok, other=0.0).to(tl.float32)
        d += s_out[:, None] * s_in[None, :]
    offsets = rows[:, None] * in_features + cols[None, :]
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if FORM == 0:
        w_prime = w + w * d
    elif FORM == 1:
        w_prime = w * d
    else:
        w_prime = w + d
    tl.store(out_ptr + offsets, w_prime.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_grad_kernel(gw_ptr, w_ptr, s_in_ptr, s_out_ptr, part_out_ptr, part_in_ptr, out_features, in_features,
                       rows_per_group, tiles_per_group, cols_per_split,
                       RANK: tl.constexpr, RANK_P2: tl.constexpr, FORM: tl.constexpr, NEED_OUT: tl.constexpr,
                       NEED_IN: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """Program (group x row tile, column split): dD = dW' * W over its tile (dW' alone for the
    additive form); partial dS_out[split, row, r] = sum over its columns of dD * s_in[r], and
    partial dS_in[tile, group, r, col] = sum over its rows of s_out[:, r] * dD."""
    group, tile = tl.program_id(0) // tiles_per_group, tl.program_id(0) % tiles_per_group
    split = tl.program_id(1)
    local = tile * BLOCK_O + tl.arange(0, BLOCK_O)
    rows = group * rows_per_group + local
    row_ok = local < rows_per_group
    ranks = tl.arange(0, RANK_P2)
    acc_out = tl.zeros((BLOCK_O, RANK_P2), dtype=tl.float32)
    start = split * cols_per_split
    for col0 in range(start, tl.minimum(start + cols_per_split, in_features), BLOCK_I):
        cols = col0 + tl.arange(0, BLOCK_I)
        col_ok = cols < in_features
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None] * in_features + cols[None, :]
        g = tl.load(gw_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if FORM != 2:
            g = g * tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        for r in tl.static_range(RANK):
            if NEED_OUT:
                s_in = tl.load(s_in_ptr + (group * RANK + r) * in_features + cols, mask=col_ok, other=0.0)
                part = tl.sum(g * s_in.to(tl.float32)[None, :], axis=1)
                acc_out += tl.where(ranks[None, :] == r, part[:, None], 0.0)
            if NEED_IN:
                s_out = tl.load(s_out_ptr + rows * RANK + r, mask=row_ok, other=0.0).to(tl.float32)
                part_in = tl.sum(g * s_out[:, None], axis=0)
                tl.store(part_in_ptr + ((tile * (out_features // rows_per_group) + group) * RANK + r) * in_features
                         + cols, part_in, mask=col_ok)
    if NEED_OUT:
        tl.store(part_out_ptr + (split * out_features + rows[:, None]) * RANK + ranks[None, :], acc_out,
                 mask=row_ok[:, None] & (ranks[None, :] < RANK))


def _layout(weight: torch.Tensor, scale_in: torch.Tensor) -> tuple[int, int, int, int]:
    """(groups, rank, rows per group, row tiles per group) of a weight and its input-side scale."""
    groups = scale_in.shape[0]
    rank = 1 if scale_in.dim() == 2 else scale_in.shape[1]
    rows_per_group = weight.shape[0] // groups
    return groups, rank, rows_per_group, triton.cdiv(rows_per_group, BLOCK_O)


def rescaled_weight(weight: torch.Tensor, scale_in: torch.Tensor, scale_out: torch.Tensor, form: str,
                    dtype: torch.dtype) -> torch.Tensor:
    """W' (out, in) in ``dtype``, computed in fp32 from W and D = S_out S_in in one pass. Not differentiable."""
    check_device(weight)
    weight, scale_in, scale_out = weight.contiguous(), scale_in.contiguous(), scale_out.contiguous()
    out_features, in_features = weight.shape
    groups, rank, rows_per_group, tiles = _layout(weight, scale_in)
    out = torch.empty((out_features, in_features), dtype=dtype, device=weight.device)
    grid = (groups * tiles, triton.cdiv(in_features, BLOCK_I))
    _rescale_kernel[grid](weight, scale_in, scale_out, out, in_features, rows_per_group, tiles,
                          RANK=rank, FORM=FORMS[form], BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I)
    return out


def scale_grads(grad_weight: torch.Tensor, weight: torch.Tensor, scale_in: torch.Tensor, scale_out: torch.Tensor,
                form: str, need_in: bool, need_out: bool, splits: int = 0):
    """(dS_in, dS_out) in the scales' shapes and dtypes (None where not needed) from dW' = dy^T x.

    ``splits``: column splits of each row tile (0: enough programs to fill the GPU)."""
    check_device(weight)
    grad_weight, weight = grad_weight.contiguous(), weight.contiguous()
    scale_in, scale_out = scale_in.contiguous(), scale_out.contiguous()
    out_features, in_features = weight.shape
    groups, rank, rows_per_group, tiles = _layout(weight, scale_in)
    col_blocks = triton.cdiv(in_features, BLOCK_I)
    if splits <= 0:
        splits = min(col_blocks, max(1, triton.cdiv(4 * _processors(weight.device), groups * tiles)))
    cols_per_split = triton.cdiv(col_blocks, splits) * BLOCK_I
    splits = triton.cdiv(in_features, cols_per_split)
    f32 = dict(dtype=torch.float32, device=weight.device)
    part_out = torch.empty((splits, out_features, rank), **f32) if need_out else weight.new_empty(1)
    part_in = torch.empty((tiles, groups, rank, in_features), **f32) if need_in else weight.new_empty(1)
    _scale_grad_kernel[(groups * tiles, splits)](
        grad_weight, weight, scale_in, scale_out, part_out, part_in, out_features, in_features, rows_per_group,
        tiles, cols_per_split, RANK=rank, RANK_P2=triton.next_power_of_2(rank), FORM=FORMS[form],
        NEED_OUT=need_out, NEED_IN=need_in, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I)
    grad_in = part_in.sum(0).view(scale_in.shape).to(scale_in.dtype) if need_in else None
    grad_out = part_out.sum(0).view(scale_out.shape).to(scale_out.dtype) if need_out else None
    return grad_in, grad_out


@functools.cache
def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def unavailable(device: torch.device) -> Optional[str]:
    """None if the kernels build and run on ``device``, else why not, in one line (Triton builds its
    launcher with the system's C compiler on first use, which a slim container may lack)."""
    try:
        w = torch.ones(4, 4, device=device)
        rescaled_weight(w, torch.zeros(1, 4, device=device), torch.zeros(4, device=device), "residual", torch.float32)
        scale_grads(w, w, torch.zeros(1, 4, device=device), torch.zeros(4, device=device), "residual", True, True)
    except Exception as e:  # any build or launch failure: the caller falls back to torch's ops
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    return None
