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

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """``__getattr__``, ``__dir__`` and ``__all__`` for a package whose names load on first use (PEP 562):
    ``exports`` maps each submodule (".adapter") to the names it gives."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(where[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted([*vars(importlib.import_module(package)), *where])

    return __getattr__, __dir__, sorted(where)


__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
