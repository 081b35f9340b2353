"""rlrr: Residual-based Low-Rank Rescaling (CVPR 2024) for timm ViT and Swin backbones."""
from .adapter import (
                      RLRRConfig,
                      apply_rlrr,
                      count_trainable,
                      load_adapter,
                      merge_rlrr,
                      save_adapter,
                      trainable_parameters,
)
from .layers import RLRRLinear, ScaleShift
from .model import build_model, create_model
from .pretrained import CheckpointError, load_pretrained

__version__ = "0.1.0"
__all__ = ["RLRRConfig", "apply_rlrr", "merge_rlrr", "save_adapter", "load_adapter", "create_model", "build_model",
           "load_pretrained", "count_trainable", "trainable_parameters", "RLRRLinear", "ScaleShift",
           "CheckpointError"]
