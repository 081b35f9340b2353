"""rlrr: Residual-based Low-Rank Rescaling (CVPR 2024) for timm ViT, Swin and CNN backbones, with its baselines."""
from .adapter import (
                      apply_rlrr,
                      count_trainable,
                      load_adapter,
                      merge_rlrr,
                      save_adapter,
                      trainable_parameters,
)
from .config import RLRRConfig
from .inference import AdapterBank, load_model
from .layers import RLRRConv2d, RLRRLinear, ScaleShift
from .model import build_model, create_model, merge_model
from .pretrained import CheckpointError, load_pretrained

__version__ = "0.1.0"
__all__ = ["RLRRConfig", "apply_rlrr", "merge_rlrr", "save_adapter", "load_adapter", "create_model", "build_model",
           "load_pretrained", "count_trainable", "trainable_parameters", "RLRRLinear", "RLRRConv2d", "ScaleShift",
           "CheckpointError", "merge_model", "load_model", "AdapterBank"]
