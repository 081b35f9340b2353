"""Where RLRR goes in timm models, and the model-level API: apply, merge, save and load adapters.

Placement follows docs/method.md, section 3 (the official code): RLRR on every attention qkv/proj and MLP
fc1/fc2 (plus Swin's patch-merging reduction), SSF after each block's two norms and the final norm,
and, on ViT only, after the patch embedding. Any other model (timm ResNet, MobileNetV2, ...) gets
RLRR on every plain nn.Conv2d (section 8). Everything else is frozen; the head is trainable and
starts at zero.
"""
import json
import logging
import os
from typing import Iterator, Optional

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.swin_transformer import PatchMerging, SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .atomic import write_atomic
from .config import RLRRConfig, check_rlrr_variant
from .layers import Init, RLRRConv2d, RLRRLinear, ScaleShift, fold_bias_into_preceding_norm

ADAPTER_FORMAT = "rlrr.adapter/1"
log = logging.getLogger("rlrr")


def is_transformer(model: nn.Module) -> bool:
    return isinstance(model, (VisionTransformer, SwinTransformer))


def transformer_targets(model: nn.Module, config: RLRRConfig) -> tuple[dict[str, int], dict[str, int]]:
    """({linear path: in_groups}, {SSF base path: channel dim}) for a timm ViT or Swin."""
    linears, ssf = {}, {}
    if isinstance(model, VisionTransformer):
        qkv_groups = 1 if config.split_qkv is False else 3
        if isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d):
            ssf["patch_embed.proj"] = 1
        for i, block in enumerate(model.blocks):
            if not hasattr(block.attn, "qkv"):
                raise TypeError(f"blocks.{i}.attn has no fused qkv layer; RLRR supports timm's standard ViT blocks")
            linears.update({f"blocks.{i}.attn.qkv": qkv_groups, f"blocks.{i}.attn.proj": 1,
                            f"blocks.{i}.mlp.fc1": 1, f"blocks.{i}.mlp.fc2": 1})
            ssf.update({f"blocks.{i}.norm1": -1, f"blocks.{i}.norm2": -1})
        for name in ("norm", "fc_norm"):
            if isinstance(getattr(model, name), nn.LayerNorm):
                ssf[name] = -1
    elif isinstance(model, SwinTransformer):
        qkv_groups = 3 if config.split_qkv else 1
        for i, stage in enumerate(model.layers):
            if isinstance(stage.downsample, PatchMerging):
                linears[f"layers.{i}.downsample.reduction"] = 1
            for j, _ in enumerate(stage.blocks):
                p = f"layers.{i}.blocks.{j}"
                linears.update({f"{p}.attn.qkv": qkv_groups, f"{p}.attn.proj": 1,
                                f"{p}.mlp.fc1": 1, f"{p}.mlp.fc2": 1})
                ssf.update({f"{p}.norm1": -1, f"{p}.norm2": -1})
        ssf["norm"] = -1
    else:
        raise TypeError(f"expected a timm VisionTransformer or SwinTransformer, got {type(model).__name__}")
    if config.targets is not None:
        linears = {p: g for p, g in linears.items() if p.rpartition(".")[2] in config.targets}
    return linears, (ssf if config.ssf else {})


def conv_targets(model: nn.Module) -> list[str]:
    """Every plain nn.Conv2d of a CNN (subclasses such as timm's Conv2dSame, whose forward pads
    differently, stay frozen)."""
    return [n for n, m in model.named_modules() if type(m) is nn.Conv2d]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _num_channels(module: nn.Module, channel_dim: int) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    raise TypeError(f"SSF expects a LayerNorm, Linear or Conv2d, got {type(module).__name__}")


def backbone_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def is_adapted(model: nn.Module) -> bool:
    return any(isinstance(m, (RLRRLinear, RLRRConv2d, ScaleShift)) for m in model.modules())


def apply_rlrr(model: nn.Module, config: Optional[RLRRConfig] = None) -> nn.Module:
    """Adapt a timm ViT or Swin (linears + SSF), or any other model's plain convolutions, in place and
    return it; only adapter vectors and the head train."""
    config = config or RLRRConfig()
    check_rlrr_variant(config, "RLRRConfig")
    if is_adapted(model):
        raise ValueError("apply_rlrr: the model already has RLRR layers")
    variant = dict(rank=config.rank, sides=config.sides, form=config.form)
    model.requires_grad_(False)
    starts = {}
    if is_transformer(model):
        init = "official" if config.init == "auto" else config.init
        linears, ssf = transformer_targets(model, config)
        for path, groups in linears.items():
            _set_submodule(model, path, RLRRLinear(model.get_submodule(path), in_groups=groups, init=init, **variant))
            starts[path] = init
        add_scale_shift(model, ssf, init)
    else:
        convs = conv_targets(model)
        if not convs:
            raise TypeError(f"RLRR found nothing to adapt in {type(model).__name__}: it is not a timm ViT or Swin "
                            "and has no plain nn.Conv2d")
        for path in convs:
            conv = model.get_submodule(path)
            starts[path] = conv_start(conv, config.init)
            _set_submodule(model, path, RLRRConv2d(conv, init=starts[path], **variant))
    zero_trainable_head(model)
    model.rlrr_config = config
    model.rlrr_starts = {s: sum(v == s for v in starts.values()) for s in sorted(set(starts.values()))}
    log.info(f"RLRR start (model.rlrr.init = {config.init}): " +
             ", ".join(f"{s} on {n} of {len(starts)} layers" for s, n in model.rlrr_starts.items()))
    return model


SMALL_FAN_IN = 36  # below it, the reference's bounds (6 / sqrt(fan-in) for s_out s_in) exceed 1: weights can flip


def conv_start(conv: nn.Conv2d, init: str) -> str:
    """The start of one convolution's RLRR. "auto": the reference's, unless the convolution's fan-in in
    the RLRR matrix view, in/groups x kernel width, is below SMALL_FAN_IN (depthwise 3x3: 3, MobileNetV2's
    stem: 9, at the reference's up to +-3.5): there W' = W at step 0 (identity)."""
    if init != "auto":
        return init
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[1]
    return "identity" if fan_in < SMALL_FAN_IN else "official"


def add_scale_shift(model: nn.Module, placement: dict[str, int], init: Init) -> None:
    """SSF after each module of ``placement`` ({path: channel dim})."""
    for path, channel_dim in placement.items():
        base = model.get_submodule(path)
        _set_submodule(model, path, ScaleShift(base, _num_channels(base, channel_dim), channel_dim, init))


@torch.no_grad()
def merge_rlrr(model: nn.Module) -> nn.Module:
    """Fold every RLRR/SSF layer into its frozen weights, in place; returns the plain timm model.

    The result has exactly the state_dict keys of ``timm.create_model(<same name>)``. Merging is
    done in fp32, cast once to each weight's dtype, and refused if anything is non-finite.
    """
    if not is_adapted(model):
        raise ValueError("merge_rlrr: the model has no RLRR layers")
    # SSF first: a bias-free linear's shift may be folded into the (plain) norm before it.
    for path, module in list(model.named_modules()):
        if isinstance(module, ScaleShift):
            _set_submodule(model, path, module.merged())
    for path, module in list(model.named_modules()):
        if isinstance(module, RLRRConv2d):
            _set_submodule(model, path, module.merged())
        elif isinstance(module, RLRRLinear):
            merged = module.merged()
            if module.bias is None:
                parent = model.get_submodule(path.rpartition(".")[0])
                if not isinstance(parent, PatchMerging):
                    raise ValueError(f"merge_rlrr: don't know where to fold the bias shift of bias-free {path}")
                merged = fold_bias_into_preceding_norm(merged, parent.norm)
            _set_submodule(model, path, merged)
    model.requires_grad_(True)
    if hasattr(model, "rlrr_config"):
        del model.rlrr_config
    return model


def zero_trainable_head(model: nn.Module) -> None:
    """Every task starts from a zero classifier, which trains (the reference's choice for RLRR)."""
    for p in model.get_classifier().parameters():
        nn.init.zeros_(p)
        p.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def statistics_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm running statistics. They move during training (train mode, as in the reference's
    ResNet), so adapter files and checkpoints carry them with the trainable tensors."""
    return {f"{path}.{name}" if path else name: b for path, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for name, b in m.named_buffers(recurse=False) if b is not None}


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for _, p in trainable_parameters(model))


def save_adapter(model: nn.Module, path: str) -> None:
    """Write the trainable tensors (fp32), BatchNorm statistics (as they are) and metadata to a
    safetensors file, atomically."""
    tensors = {n: p.detach().float().cpu().contiguous() for n, p in trainable_parameters(model)}
    tensors.update({n: b.detach().cpu().contiguous() for n, b in statistics_buffers(model).items()})
    config = getattr(model, "rlrr_config", None)
    write_adapter(tensors, path, backbone_name(model), getattr(model, "num_classes", None), config)


def write_adapter(tensors: dict[str, torch.Tensor], path: str, backbone: str, num_classes: Optional[int],
                  config: Optional[RLRRConfig]) -> None:
    metadata = {
        "format": ADAPTER_FORMAT,
        "backbone": backbone,
        "num_classes": json.dumps(num_classes),
        "rlrr_config": json.dumps(config.to_dict() if config else None),
        "shapes": json.dumps({n: list(t.shape) for n, t in tensors.items()}),
    }
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_adapter(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file; a clear error if it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for non-safetensors bytes
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: not an rlrr adapter file (metadata format={metadata.get('format')!r}, "
                         f"expected {ADAPTER_FORMAT!r})")
    return tensors, metadata


def check_adapter_fit(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor], source: str,
                      target: str) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor."""
    problems = [f"missing {n} {tuple(p.shape)}" for n, p in params.items() if n not in tensors]
    problems += [f"unexpected {n} {tuple(t.shape)}" for n, t in tensors.items() if n not in params]
    problems += [f"shape of {n}: file {tuple(t.shape)} vs model {tuple(params[n].shape)}"
                 for n, t in tensors.items() if n in params and t.shape != params[n].shape]
    if problems:
        raise ValueError(f"{source} does not fit {target}: {len(problems)} mismatch(es): " + "; ".join(problems))


@torch.no_grad()
def load_adapter(model: nn.Module, path: str) -> dict[str, str]:
    """Copy an adapter file into an adapted model; every name/shape mismatch is reported at once."""
    tensors, metadata = read_adapter(path)
    params = {**dict(trainable_parameters(model)), **statistics_buffers(model)}
    check_adapter_fit(tensors, params, f"{path} (backbone {metadata.get('backbone')})", backbone_name(model))
    for n, p in params.items():
        p.copy_(tensors[n])
    return metadata
