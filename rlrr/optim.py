"""AdamW with the reference's weight-decay grouping, and timm's cosine schedule per optimizer step."""
import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler


def no_weight_decay(name: str) -> bool:
    """The reference's rule, by name: no decay for names containing 'bias' or 'norm'. Here that is the
    bias shifts, the SSF after norms and the head bias; the scale vectors, patch SSF and head weight
    decay. (timm's ndim<=1 rule would change the recipe: the official vectors are 2-D.)"""
    return "bias" in name or "norm" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # an empty group breaks DeepSpeed and resumes


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch's fused AdamW (one kernel, CPU and CUDA): it can also skip a step on a flag held on the device
    (``found_inf``, as the gradient scaler uses it), so no step waits for the GPU to decide."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=True)


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float):
    """Linear warmup from warmup_lr, then cosine to min_lr, as a function of the optimizer step
    (``scheduler.step_update(step)``): resuming needs only the step count."""
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps), lr_min=min_lr, warmup_t=warmup_steps,
                             warmup_lr_init=warmup_lr, t_in_epochs=False)
