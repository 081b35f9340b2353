"""What train.compile and train.cuda_graphs resolve to for a run, and the compile cache it shares.

- ``compile`` null: torch.compile on CUDA (inductor fuses RLRR's per-layer passes and the norms around
  the matmuls), eager on CPU (inductor's C++ build costs more there than it saves).
- ``compile_scope`` auto (the default): the whole model where the steps replay as CUDA graphs, each
  repeated block otherwise. ``blocks``: each repeated block (ViT's blocks; Swin's and ResNet's blocks
  within a stage) is compiled on its own, in place. Identical blocks share one compiled graph, so the
  compile costs one block's time whatever the depth (docs/benchmarks.md; blocks that differ only in
  their drop-path rate hold it as a tensor to stay identical, DropAtRate), and names, state dicts and
  DDP's per-parameter gradient hooks stay as they are. The patch embedding, final norm and head run
  eagerly (a few kernels). ``model``: the whole model as one graph (DDP engine and benchmark; not with
  its blocks marked as nested compile regions: on torch 2.14 with inductor those regions gave wrong
  gradients from the second step on, docs/benchmarks.md). Under CUDA graphs each block's graph is
  replayed on its own, and each replay costs host time (dynamo's guards, AOTAutograd's wrappers, the
  graph tree's checks: 0.25-0.35 ms a block on a 2-core CPU, before the graph trees): at ViT-B/16's
  batch 8 on an H200 the whole model as one graph ran at 1,068 img/s against 600 by blocks in the
  same run. It takes longer to compile (51 s against 16 s there), once per process start, cached for
  restarts (docs/benchmarks.md). Without CUDA graphs the blocks' host time overlaps the device's work.
- ``cuda_graphs`` null: compiled steps are replayed as CUDA graphs (torch.compile's "reduce-overhead")
  in a one-process DDP-engine run on CUDA, where the per-layer launches dominate small per-GPU batches.
  Not by default across processes: PyTorch's CUDA-graph trees and DDP's gradient hooks have open
  issues together (pytorch/pytorch#128218); ``true`` turns them on there anyway.
- Combinations that cannot work fall back with one line each: compile under DeepSpeed ZeRO-3 (its
  parameter gather/release hooks split every graph) and CUDA graphs with the DeepSpeed engine, off
  CUDA, without compile, or with activation checkpointing around compiled blocks (graphs_blocked).
Training batches already have one shape (every epoch wraps to full batches); a compiled run's evaluation
pads its last batch to the fixed size and drops the padded rows (rlrr.evaluate): one graph, where a
short batch would compile another (with dynamic shapes) or record another CUDA graph.
"""
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .distributed import DistInfo

RECOMPILE_LIMIT = 64  # compiled variants per block class (shapes, train/eval): Swin-B's has up to 16


@dataclass
class CompilePlan:
    compile: bool
    cuda_graphs: bool
    cache_dir: str
    notes: list = field(default_factory=list)  # one line per setting that fell back, and why
    scope: str = "blocks"  # train.compile_scope, "auto" resolved: "blocks" or "model"

    @property
    def mode(self):
        """torch.compile's mode argument."""
        return "reduce-overhead" if self.cuda_graphs else None

    @property
    def warmup_steps(self) -> int:
        """Optimizer steps of each process start that img/s leaves out: the first (compiling) and, with CUDA
        graphs, the second (torch.compile's graph trees run a graph eagerly once, then record it)."""
        return 2 if self.cuda_graphs else 1

    def to_dict(self) -> dict:
        return {"compile": self.compile, "cuda_graphs": self.cuda_graphs, "scope": self.scope,
                "cache_dir": self.cache_dir}


def compile_plan(cfg, info: DistInfo) -> CompilePlan:
    t, cuda = cfg.train, info.device.type == "cuda"
    notes = []
    compiled = cuda if t.compile is None else t.compile
    if compiled and t.engine == "deepspeed" and t.zero_stage == 3:
        notes.append(f"train.compile = {_shown(t.compile)}: not under DeepSpeed ZeRO-3 (its parameter gather/release "
                     "hooks split every graph); running eager")
        compiled = False
    auto_graphs = compiled and cuda and t.engine == "ddp" and info.world == 1
    graphs = auto_graphs if t.cuda_graphs is None else t.cuda_graphs
    # "auto" is whole where it can replay its steps as graphs (one replay a pass, not one a block)
    graphs_scope = "model" if t.compile_scope == "auto" else t.compile_scope
    why_not = ("it needs CUDA" if not cuda else "it needs train.compile" if not compiled else
               "not with the DeepSpeed engine (its step runs outside the compiled graph)" if t.engine == "deepspeed"
               else graphs_blocked(graphs_scope, cfg.model.grad_checkpointing))
    if graphs and why_not:
        notes.append(f"train.cuda_graphs = {_shown(t.cuda_graphs)}: {why_not}; off")
        graphs = False
    elif t.cuda_graphs is None and compiled and cuda and t.engine == "ddp" and info.world > 1:
        notes.append(f"train.cuda_graphs = null: off with DDP across {info.world} processes "
                     "(pytorch/pytorch#128218); set it to true to try")
    cache = t.compile_cache or os.path.join(cfg.output_dir, "compile_cache")
    scope = t.compile_scope if t.compile_scope != "auto" else graphs_scope if graphs else "blocks"
    return CompilePlan(compiled, graphs, os.path.abspath(cache), notes, scope)


def graphs_blocked(scope: str, grad_checkpointing: bool):
    """Why compiled blocks cannot be replayed as CUDA graphs, or None. Activation checkpointing (timm's,
    non-reentrant) wraps each compiled block from outside, and its recompute in backward keeps a block's
    graph-owned output alive where the recording saw it freed: CUDA-graph trees stop the run
    (pytorch/pytorch#154306, in torch 2.11) or would overwrite live memory. A whole-model graph
    holds the checkpointing inside, where the compiler does the recompute."""
    if scope == "blocks" and grad_checkpointing:
        return ("not with model.grad_checkpointing around compiled blocks (pytorch/pytorch#154306); "
                "train.compile_scope = model keeps them")
    return None


def prepare_compile(plan: CompilePlan, requested) -> None:
    """Before anything compiles: point inductor (and Triton, which caches under it) at the run's cache
    folder, so the run, its requeued restarts and the other runs of the same output_dir reuse what was
    compiled (inductor's caches are keyed by content and written atomically: ranks and runs may share
    one folder). A default compile (``requested`` None) that fails to build a graph runs that graph
    eager with a warning instead of ending the run; an explicit ``true`` lets the error through."""
    if plan.compile:
        import torch._dynamo
        os.makedirs(plan.cache_dir, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = plan.cache_dir
        torch._dynamo.config.suppress_errors = requested is None


def repeated_blocks(module: nn.Module) -> list:
    """The innermost repeated blocks below ``module``: the children of each nn.Sequential or nn.ModuleList
    whose two or more children share one class (ViT's blocks; Swin's blocks in each stage, not the stages;
    a ResNet's bottlenecks in each stage)."""
    found = []
    for child in module.children():
        inner = repeated_blocks(child)
        kids = list(child.children())
        if inner:
            found += inner
        elif isinstance(child, (nn.Sequential, nn.ModuleList)) and len(kids) > 1 and len({type(k) for k in kids}) == 1:
            found += kids
    return found


def compile_blocks_in_place(model: nn.Module, plan: CompilePlan, backend: str = "inductor") -> bool:
    """With a compiled plan in scope "blocks": torch.compile each of ``model``'s repeated blocks in place
    (nn.Module.compile), their drop-path rates made tensors (rates_as_tensors). True if it did; False: the
    caller compiles the whole model (scope "model", or no repeated blocks, which adds a note)."""
    if not plan.compile or plan.scope != "blocks":
        return False
    blocks = repeated_blocks(model)
    if not blocks:
        plan.notes.append(f"train.compile_scope = blocks: {type(model).__name__} has no repeated blocks; "
                          "compiling the whole model")
        return False
    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    rates_as_tensors(blocks)
    for block in blocks:  # static shapes: a block class seen at several sizes (Swin's stages) gets a graph per size
        block.compile(backend=backend, mode=plan.mode, dynamic=False)
    return True


class DropAtRate(nn.Module):
    """Dropout (element-wise, rlrr's drop_path_mode "dropout") or DropPath (per sample) with its rate held in
    a tensor. torch.compile specialises a graph on Python floats, so blocks that differ only in their
    drop-path rate (a linear schedule over depth) would each compile their own graph; a tensor rate is a
    graph input. Not a buffer: DDP would broadcast it every step, and state dicts stay as they are."""

    def __init__(self, rate: float, per_sample: bool, device: torch.device):
        super().__init__()
        self.per_sample = per_sample
        self.rate = torch.tensor(float(rate), device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.dim() - 1) if self.per_sample else x.shape
        kept = torch.rand(shape, device=x.device) < keep
        return x * (kept / keep.clamp_min(1e-12)).to(x.dtype)  # a rate of 1 drops everything (0 / tiny)

    def extra_repr(self) -> str:
        return f"rate={self.rate.item():g}, per_sample={self.per_sample}"


def _rate(module: nn.Module):
    """(drop rate, per sample) of a dropout-like module; None for anything else."""
    import timm.layers
    if isinstance(module, timm.layers.DropPath):  # DropAtRate rescales survivors, as timm does by default
        return (module.drop_prob, True) if getattr(module, "scale_by_keep", True) else None
    if type(module) is nn.Dropout:
        return module.p, False
    if type(module) is nn.Identity:  # timm's drop path at rate 0
        return 0.0, None
    return None


def rates_as_tensors(blocks: list) -> int:
    """Where the blocks differ only in a dropout-like module's rate (the same name in each, different rates),
    replace those modules with DropAtRate, so the blocks share one compiled graph. Returns how many."""
    by_name = {}
    for block in blocks:
        for name, module in block.named_modules():
            by_name.setdefault(name, []).append((block, module, _rate(module)))
    replaced = 0
    for name, found in by_name.items():
        rates = [r for _, _, r in found]
        kinds = {r[1] for r in rates if r is not None and r[1] is not None}  # per sample or not (Identity: either)
        if not name or None in rates or len({r[0] for r in rates}) < 2 or len(kinds) != 1:
            continue
        parent, _, child = name.rpartition(".")
        (per_sample,) = kinds
        for block, _, (rate, _) in found:
            device = next(block.parameters(), torch.empty(0)).device
            setattr(block.get_submodule(parent), child, DropAtRate(rate, per_sample, device))
            replaced += 1
    return replaced


def _shown(value) -> str:
    return "null" if value is None else str(value).lower()
