"""The one model factory: a timm model, its local pre-trained file, the attention and drop-path
choices, the fine-tuning method and activation checkpointing, from a ``ModelConfig``.

    model = build_model(cfg.model, num_classes, seed=cfg.train.seed)

Training, ``rlrr.create_model``, the tools and the tests all build models here. A method is one
entry in ``METHODS`` (and its name in ``config.Method``): a function that takes the plain
pre-trained timm model and decides what trains.
"""
import typing
from typing import Callable, Optional

import timm
import torch
import torch.nn as nn

from .adapter import apply_rlrr, is_adapted, merge_rlrr, zero_trainable_head
from .baselines import LoraOptions, apply_bitfit, apply_lora, apply_ssf, merge_lora
from .config import Method, ModelConfig, RLRRConfig, frozen_storage
from .layers import Kernel, RLRRLinear
from .pretrained import load_pretrained


def _rlrr(model: nn.Module, m: ModelConfig) -> nn.Module:
    return apply_rlrr(model, m.rlrr)


def _linear_probe(model: nn.Module, m: ModelConfig) -> nn.Module:
    model.requires_grad_(False)  # the frozen backbone; only the (zero-initialised) head trains
    zero_trainable_head(model)
    return model


def _full(model: nn.Module, m: ModelConfig) -> nn.Module:
    model.requires_grad_(True)  # every weight trains, from the same zero head as the other methods
    zero_trainable_head(model)
    return model


def _lora(model: nn.Module, m: ModelConfig) -> nn.Module:
    return apply_lora(model, LoraOptions(r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                                         targets=tuple(m.lora.targets)))


METHODS: dict[str, Callable[[nn.Module, ModelConfig], nn.Module]] = {
    "rlrr": _rlrr, "linear": _linear_probe, "full": _full, "bitfit": lambda model, m: apply_bitfit(model),
    "ssf": lambda model, m: apply_ssf(model, "identity" if m.rlrr.init == "identity" else "official"), "lora": _lora}
if set(METHODS) != set(typing.get_args(Method)):
    raise ImportError(f"rlrr.model.METHODS {sorted(METHODS)} and config.Method {typing.get_args(Method)} disagree")


def build_model(m: ModelConfig, num_classes: int, seed: Optional[int] = None) -> nn.Module:
    """The model of ``m`` before training. With ``seed``, whatever the pre-trained file does not set
    (the head, the adapter; the whole backbone when there is no file) is drawn from that seed alone,
    so every rank, and a rebuild after training, gets the same model; the caller's RNG state is
    left as it was."""
    if seed is None:
        return _build(m, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(m, num_classes)


def _build(m: ModelConfig, num_classes: int) -> nn.Module:
    model = create_timm(m.name, m.img_size, pretrained=False, num_classes=num_classes, drop_path_rate=m.drop_path,
                        **m.timm_kwargs)
    if m.pretrained:
        load_pretrained(model, m.pretrained)
    use_fused_attention(model, m.fused_attn)
    if m.drop_path_mode == "dropout":
        drop_path_as_dropout(model)
    model = METHODS[m.method](model, m)
    set_kernel(model, m.kernel)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)  # timm's checkpointing is non-reentrant: frozen inputs still give grads
    return model


def merge_model(model: nn.Module) -> nn.Module:
    """The plain timm model of a trained one, in place: RLRR and SSF layers folded (merge_rlrr),
    LoRA merged by peft; the other methods already are plain."""
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):  # peft is imported only for LoRA
        return merge_lora(model)
    return merge_rlrr(model) if is_adapted(model) else model


def create_timm(name: str, img_size: int, **kwargs) -> nn.Module:
    """timm.create_model with ``img_size`` where the model takes one (ViT, Swin); CNNs take any size."""
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, **kwargs)


def create_model(name: str, num_classes: int, pretrained: Optional[str] = None,
                 config: Optional[RLRRConfig] = None, **timm_kwargs) -> nn.Module:
    """``timm.create_model(name)`` without any download, ``pretrained`` loaded from a local file, then
    RLRR with ``config``. ``img_size`` and ``drop_path_rate`` (timm's stochastic depth) may be given
    as for timm; the image size defaults to the model's own."""
    config = config or RLRRConfig()
    default_cfg = timm.models.get_pretrained_cfg(name)
    img_size = timm_kwargs.pop("img_size", default_cfg.input_size[-1] if default_cfg else 224)
    m = ModelConfig(name=name, pretrained=pretrained, img_size=img_size, method="rlrr", rlrr=config,
                    drop_path=timm_kwargs.pop("drop_path_rate", 0.0), drop_path_mode="stochastic_depth",
                    timm_kwargs=timm_kwargs)
    return build_model(m, num_classes)


def drop_path_as_dropout(model: nn.Module) -> None:
    """The reference's "drop path": element-wise dropout on the residual branches, at timm's rates."""
    for name, module in list(model.named_modules()):
        if isinstance(module, timm.layers.DropPath):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.Dropout(module.drop_prob))


def use_fused_attention(model: nn.Module, enabled: bool = True) -> int:
    """Switch every timm attention module to F.scaled_dot_product_attention (or back) and return how
    many were switched. timm enables it on ViT but leaves Swin's window attention (bias + shift mask)
    on the explicit softmax; both paths compute the same function (tests/test_model.py)."""
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for m in modules:
        m.fused_attn = enabled
    return len(modules)


def set_kernel(model: nn.Module, kernel: Kernel) -> int:
    """Run every RLRRLinear's passes around its matmuls with ``kernel`` (rlrr.layers.use_fused); a
    runtime choice, not part of the adapter. Returns how many layers were set."""
    layers = [m for m in model.modules() if isinstance(m, RLRRLinear)]
    for layer in layers:
        layer.kernel = kernel
    return len(layers)


def store_frozen_weights_as_configured(model: nn.Module, train_cfg) -> int:
    """store_frozen_weights_in(bf16) where the run's train.frozen_dtype resolves to bf16 (config.frozen_storage:
    by default, a bf16 run under DDP); the bytes saved, 0 where the weights stay as they are."""
    if frozen_storage(train_cfg.frozen_dtype, train_cfg.precision, train_cfg.engine) != "bf16":
        return 0
    return store_frozen_weights_in(model, torch.bfloat16)


@torch.no_grad()
def store_frozen_weights_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep every frozen linear weight matrix (RLRR's base weights; the backbone's under a linear
    probe) in ``dtype``, in place, and return the bytes saved. Only for bf16 training: those matmuls
    run in bf16 anyway, and RLRR still builds W' = W * (1 + s_out s_in^T) in fp32 from the stored W
    (one rounding, as before). Norms, embeddings and biases are small and stay as they are."""
    saved = 0
    for module in model.modules():
        if isinstance(module, (RLRRLinear, nn.Linear)) and not module.weight.requires_grad \
                and module.weight.dtype != dtype:
            before = module.weight.element_size()
            module.weight.data = module.weight.data.to(dtype)
            saved += module.weight.numel() * (before - module.weight.element_size())
    return saved
