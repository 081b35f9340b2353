"""rlrr/compile.py: what train.compile / train.cuda_graphs resolve to on each device, engine and world
size, with one line for every fallback; rlrr/evaluate.py's fixed-shape evaluation."""
import pytest
import torch

from rlrr.compile import compile_plan
from rlrr.config import load_config
from rlrr.data.loader import SplitLoader
from rlrr.data.manifest import Manifest
from rlrr.data.transforms import Recipe
from rlrr.distributed import DistInfo
from rlrr.evaluate import evaluate
from rlrr.model import build_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _plan(device, world=1, *overrides):
    cfg = load_config(None, ["data.shards=x", "output_dir=/runs", *overrides])
    return compile_plan(cfg, DistInfo(world=world, device=device))


@pytest.mark.parametrize("device,world,overrides,compiled,graphs,note", [
    (CPU, 1, [], False, False, None),  # the defaults: eager on CPU ...
    (CUDA, 1, [], True, True, None),  # ... compiled with CUDA graphs on one GPU ...
    (CUDA, 8, [], True, False, "train.cuda_graphs = null: off with DDP across 8 processes"),  # ... not across 8
    (CUDA, 8, ["train.cuda_graphs=true"], True, True, None),  # unless asked
    (CPU, 1, ["train.compile=true"], True, False, None),
    (CPU, 1, ["train.compile=true", "train.cuda_graphs=true"], True, False,
     "train.cuda_graphs = true: it needs CUDA; off"),
    (CUDA, 1, ["train.compile=false", "train.cuda_graphs=true"], False, False,
     "train.cuda_graphs = true: it needs train.compile; off"),
    (CUDA, 2, ["train.engine=deepspeed", "train.zero_stage=2"], True, False, None),
    (CUDA, 2, ["train.engine=deepspeed", "train.zero_stage=2", "train.cuda_graphs=true"], True, False,
     "train.cuda_graphs = true: not with the DeepSpeed engine"),
    (CUDA, 2, ["train.engine=deepspeed", "train.zero_stage=3"], False, False,
     "train.compile = null: not under DeepSpeed ZeRO-3"),
    (CPU, 2, ["train.engine=deepspeed", "train.zero_stage=3", "train.compile=true"], False, False,
     "train.compile = true: not under DeepSpeed ZeRO-3"),
])
def test_compile_plan(device, world, overrides, compiled, graphs, note):
    plan = _plan(device, world, *overrides)
    assert (plan.compile, plan.cuda_graphs) == (compiled, graphs)
    assert plan.mode == ("reduce-overhead" if graphs else None)
    if note is None:
        assert plan.notes == []
    else:
        assert len(plan.notes) == 1 and plan.notes[0].startswith(note) and "\n" not in plan.notes[0]


def test_compile_cache_defaults_to_the_output_dir_and_may_be_set():
    assert _plan(CPU).cache_dir == "/runs/compile_cache"
    assert _plan(CPU, 1, "train.compile_cache=/shared/cache").cache_dir == "/shared/cache"


class _RecordingEngine:
    """The engine interface evaluate() uses, around a plain model, recording each batch's shape."""

    def __init__(self, model, static_shapes):
        self.model, self.static_shapes, self.shapes = model, static_shapes, []

    def forward(self, images):
        self.shapes.append(tuple(images.shape))
        return self.model(images)


def test_fixed_shape_evaluation_pads_the_last_batch_and_scores_only_real_samples(tiny_shards):
    """13 test images in batches of 5: the CUDA-graph path sees 3 batches of 5 (the last padded with
    2 zero images) and reports exactly the accuracy and loss of the unpadded evaluation."""
    cfg = load_config(None, ["data.shards=x", "model.name=test_vit", "model.img_size=32"])
    model = build_model(cfg.model, num_classes=4, seed=0).eval()
    with torch.no_grad():
        model.head.weight.normal_(generator=torch.Generator().manual_seed(0))  # predictions that differ
    loader = SplitLoader(Manifest(tiny_shards), "test", train=False, batch_size=5,
                         recipe=Recipe("vtab", False, image_size=32), in_memory=True)
    results = {}
    for static in (False, True):
        engine = _RecordingEngine(model, static)
        results[static] = evaluate(engine, loader, DistInfo(), 4, "half")
        assert engine.shapes == ([(5, 3, 32, 32)] * 3 if static else [(5, 3, 32, 32)] * 2 + [(3, 3, 32, 32)])
    assert results[True]["samples"] == results[False]["samples"] == 13
    assert results[True]["acc1"] == results[False]["acc1"]
    # the same 13 losses in the same order; only the GEMM kernel a row count picks may differ (fp32 order)
    assert results[True]["loss"] == pytest.approx(results[False]["loss"], rel=64 * torch.finfo(torch.float32).eps)


def test_the_ddp_engine_replaying_cuda_graphs_evaluates_in_one_shape(tiny_shards):
    """The real DDPEngine with a CUDA-graph plan (static shapes; nothing compiled, so this runs on CPU):
    evaluation hands it only full batches, and scores exactly what the eager engine scores."""
    from rlrr.compile import CompilePlan
    from rlrr.engine import DDPEngine
    cfg = load_config(None, ["data.shards=x", "model.name=test_vit", "model.img_size=32", "train.batch_size=4"])
    loader = SplitLoader(Manifest(tiny_shards), "test", train=False, batch_size=5,
                         recipe=Recipe("vtab", False, image_size=32), in_memory=True)
    results, shapes = {}, []
    for graphs in (False, True):
        model = build_model(cfg.model, num_classes=4, seed=0)
        with torch.no_grad():
            model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
        engine = DDPEngine(model, cfg, DistInfo(), CompilePlan(compile=False, cuda_graphs=graphs, cache_dir="-"))
        assert engine.static_shapes == graphs
        hook = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)) if graphs else None)
        results[graphs] = evaluate(engine, loader, DistInfo(), 4, "half")
        hook.remove()
    assert shapes == [(5, 3, 32, 32)] * 3  # 13 images: the last batch padded from 3 to 5
    assert results[True]["acc1"] == results[False]["acc1"] and results[True]["samples"] == 13
