"""The methods RLRR is compared with, on the same timm models (docs/method.md, section 10):

- bitfit: every bias (and the head) trains;
- ssf: SSF alone, placed as the SSF paper does: a scale/shift after every linear of the blocks, after
  the norms and after the patch embedding; merged into those layers;
- lora: HF peft's LoRA injected into timm's linears (rank, alpha, dropout, target modules), merged
  with peft's own ``merge(safe_merge=True)``.

Each returns the model with only its own tensors (and the zero head) trainable; ``merge_lora``
returns the plain timm model.
"""
from dataclasses import dataclass

import torch.nn as nn
from timm.models.swin_transformer import PatchMerging

from .adapter import add_scale_shift, is_transformer, transformer_targets, zero_trainable_head
from .config import RLRRConfig
from .layers import Init


def apply_bitfit(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)
    zero_trainable_head(model)
    return model


def apply_ssf(model: nn.Module, init: Init = "official") -> nn.Module:
    """SSF after each block linear (qkv, proj, fc1, fc2), each norm and the ViT patch embedding. Swin's
    bias-free patch-merging reduction gets none (its shift could not merge into a bias)."""
    if not is_transformer(model):
        raise TypeError(f"method ssf supports timm ViT and Swin models, got {type(model).__name__}")
    linears, norms = transformer_targets(model, RLRRConfig(ssf=True))
    placement = {p: -1 for p in linears if not isinstance(model.get_submodule(p.rpartition(".")[0]), PatchMerging)}
    model.requires_grad_(False)
    add_scale_shift(model, {**norms, **placement}, init)
    zero_trainable_head(model)
    return model


@dataclass
class LoraOptions:
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple = ("qkv",)


def apply_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """peft LoRA on the timm linears whose names end in ``options.targets`` (B starts at zero)."""
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(options.targets), bias="none")
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)  # in place: names stay timm's, with lora_A/lora_B added
    zero_trainable_head(model)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """peft's own merge (fp32-safe, finite-checked) into each base linear, then the base linears put
    back: the plain timm model."""
    from peft.tuners.lora import LoraLayer
    found = False
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            found = True
            module.merge(safe_merge=True)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if not found:
        raise ValueError("merge_lora: the model has no LoRA layers")
    model.requires_grad_(True)
    return model
