"""rlrr: Residual-based Low-Rank Rescaling (CVPR 2024) for timm ViT, Swin and CNN backbones, with its baselines.

The names below load on first use (PEP 562): a process that needs only part of the package (a loader
worker, the protocol's orchestrator, a report) does not pay for timm's import, about 2 s."""
import importlib

_EXPORTS = {
    ".adapter": ["apply_rlrr", "count_trainable", "load_adapter", "merge_rlrr", "save_adapter", "trainable_parameters"],
    ".config": ["RLRRConfig"],
    ".inference": ["AdapterBank", "load_model"],
    ".layers": ["RLRRConv2d", "RLRRLinear", "ScaleShift"],
    ".model": ["build_model", "create_model", "merge_model"],
    ".pretrained": ["CheckpointError", "load_pretrained"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__version__ = "0.1.0"
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WHERE])
