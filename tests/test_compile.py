"""rlrr/compile.py: what train.compile / train.cuda_graphs resolve to on each device, engine and world
size, with one line for every fallback; compiling by blocks (train.compile_scope) in the engines and the
benchmark; rlrr/evaluate.py's fixed-shape evaluation."""
import json
import os
import subprocess
import sys

import pytest
import torch

from rlrr.compile import CompilePlan, compile_blocks_in_place, compile_plan, repeated_blocks
from rlrr.config import ModelConfig, load_config
from rlrr.data.loader import SplitLoader
from rlrr.data.manifest import Manifest
from rlrr.data.transforms import Recipe
from rlrr.distributed import DistInfo
from rlrr.evaluate import evaluate
from rlrr.model import build_model

from helpers import ROOT, run_tool_here, tool_module

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _plan(device, world=1, *overrides):
    cfg = load_config(None, ["data.shards=x", "output_dir=/runs", *overrides])
    return compile_plan(cfg, DistInfo(world=world, device=device))


@pytest.mark.parametrize("device,world,overrides,compiled,graphs,scope,note", [
    (CPU, 1, [], False, False, "blocks", None),  # the defaults: eager on CPU ...
    (CUDA, 1, [], True, True, "model", None),  # ... the whole model compiled with CUDA graphs on one GPU ...
    # ... by blocks without the graphs across 8 (their host time overlaps the device's work)
    (CUDA, 8, [], True, False, "blocks", "train.cuda_graphs = null: off with DDP across 8 processes"),
    (CUDA, 8, ["train.cuda_graphs=true"], True, True, "model", None),  # unless asked
    (CUDA, 1, ["train.compile_scope=blocks"], True, True, "blocks", None),  # a scope asked for is kept
    (CUDA, 8, ["train.compile_scope=model"], True, False, "model", "train.cuda_graphs = null: off with DDP"),
    (CPU, 1, ["train.compile=true"], True, False, "blocks", None),
    (CPU, 1, ["train.compile=true", "train.cuda_graphs=true"], True, False, "blocks",
     "train.cuda_graphs = true: it needs CUDA; off"),
    (CUDA, 1, ["train.compile=false", "train.cuda_graphs=true"], False, False, "blocks",
     "train.cuda_graphs = true: it needs train.compile; off"),
    # activation checkpointing around compiled blocks: no CUDA graphs (pytorch/pytorch#154306); compiled whole
    # (what auto picks for the graphs) the checkpointing is inside the graph
    (CUDA, 1, ["model.grad_checkpointing=true"], True, True, "model", None),
    (CUDA, 1, ["model.grad_checkpointing=true", "train.compile_scope=blocks"], True, False, "blocks",
     "train.cuda_graphs = null: not with model.grad_checkpointing around compiled blocks"),
    (CUDA, 1, ["model.grad_checkpointing=true", "train.cuda_graphs=true", "train.compile_scope=blocks"], True,
     False, "blocks", "train.cuda_graphs = true: not with model.grad_checkpointing around compiled blocks"),
    (CUDA, 1, ["model.grad_checkpointing=true", "train.compile_scope=model"], True, True, "model", None),
    (CUDA, 2, ["train.engine=deepspeed", "train.zero_stage=2"], True, False, "blocks", None),
    (CUDA, 2, ["train.engine=deepspeed", "train.zero_stage=2", "train.cuda_graphs=true"], True, False, "blocks",
     "train.cuda_graphs = true: not with the DeepSpeed engine"),
    (CUDA, 2, ["train.engine=deepspeed", "train.zero_stage=3"], False, False, "blocks",
     "train.compile = null: not under DeepSpeed ZeRO-3"),
    (CPU, 2, ["train.engine=deepspeed", "train.zero_stage=3", "train.compile=true"], False, False, "blocks",
     "train.compile = true: not under DeepSpeed ZeRO-3"),
])
def test_compile_plan(device, world, overrides, compiled, graphs, scope, note):
    plan = _plan(device, world, *overrides)
    assert (plan.compile, plan.cuda_graphs, plan.scope) == (compiled, graphs, scope)
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


def test_repeated_blocks_are_the_innermost_runs_of_one_class():
    """ViT: its blocks; Swin: the blocks inside each stage, not the stages; ResNet-18: two blocks per stage;
    a model whose stages hold one block each (timm's test_resnet) has none."""
    import timm
    vit = timm.create_model("test_vit", depth=3)
    assert repeated_blocks(vit) == list(vit.blocks)
    swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2), embed_dim=32, num_heads=(1, 2, 4, 8))
    assert repeated_blocks(swin) == [b for stage in swin.layers for b in stage.blocks]
    resnet = timm.create_model("resnet18")
    assert repeated_blocks(resnet) == [b for n in range(1, 5) for b in getattr(resnet, f"layer{n}")]
    assert repeated_blocks(timm.create_model("test_resnet")) == []


@pytest.mark.parametrize("checkpointing", [False, True])
def test_blocks_compiled_in_place_share_one_graph_and_train_like_eager(checkpointing):
    """train.compile_scope = blocks: 4 blocks compile once (one graph for training, one for evaluation,
    so the compile time does not grow with depth), with activation checkpointing too; parameter names are
    unchanged and the outputs and gradients are eager's, bit for bit (AOTAutograd, the path inductor takes,
    with the traced aten ops run as they are: the same kernels in the same order)."""
    from torch._dynamo.utils import counters
    cfg = ModelConfig(name="test_vit", img_size=32, drop_path=0.0, grad_checkpointing=checkpointing,
                      timm_kwargs={"depth": 4})
    eager, blocks = build_model(cfg, 4, seed=0), build_model(cfg, 4, seed=0)
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks_in_place(blocks, CompilePlan(compile=True, cuda_graphs=False, cache_dir="-"),
                                   backend="aot_eager")
    assert all(b._compiled_call_impl is not None for b in blocks.blocks)
    assert list(dict(blocks.named_parameters())) == list(dict(eager.named_parameters()))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for model in (eager, blocks):
        y = model.train()(x)
        y.square().sum().backward()
        results.append([y.detach()] + [p.grad for p in model.parameters() if p.requires_grad])
    assert counters["stats"]["unique_graphs"] == 1
    blocks.eval()(x)
    assert counters["stats"]["unique_graphs"] == 2
    assert all(torch.equal(got, want) for want, got in zip(*results))


def test_the_engines_compile_by_blocks_or_whole_as_the_plan_says():
    """DDPEngine: scope blocks compiles the blocks in place and calls the model itself; scope model, or a
    model without repeated blocks (one line), wraps the whole model in torch.compile. Nothing compiles
    before the first call."""
    from rlrr.engine import DDPEngine
    for name, scope, whole, note in (("test_vit", "blocks", False, None), ("test_vit", "model", True, None),
                                     ("test_resnet", "blocks", True, "train.compile_scope = blocks: ResNet has no")):
        cfg = load_config(None, ["data.shards=x", f"model.name={name}", "model.img_size=32", "train.compile=true",
                                 f"train.compile_scope={scope}"])
        plan = _plan(CPU, 1, "train.compile=true", f"train.compile_scope={scope}")
        assert plan.scope == scope and plan.to_dict()["scope"] == scope
        engine = DDPEngine(build_model(cfg.model, 4, seed=0), cfg, DistInfo(), plan)
        assert isinstance(engine.net, torch._dynamo.eval_frame.OptimizedModule) == whole
        assert (engine.net is engine.model) == (not whole)
        assert len(plan.notes) == (note is not None) and all(n.startswith(note) for n in plan.notes)


def test_the_benchmark_compiles_its_paths_as_training_does():
    """tools/benchmark.py: +compiled and +cudagraphs wrap the whole model, their -blocks forms compile the blocks
    in place (rlrr.compile, as a training run), and --compile means training's default scope."""
    bench = tool_module("benchmark.py")
    assert bench.parse_mode("rlrr", compile_all=True) == ("rlrr", "compiled-blocks")
    assert bench.parse_mode("full+cudagraphs-blocks") == ("full", "cudagraphs-blocks")
    cfg = ModelConfig(name="test_vit", img_size=32, timm_kwargs={"depth": 2})
    for path, whole, blocks in (("eager", False, False), ("fused", False, False), ("compiled", True, False),
                                ("cudagraphs", True, False), ("compiled-blocks", False, True),
                                ("cudagraphs-blocks", False, True)):
        model = build_model(cfg, 4, seed=0)
        net = bench._maybe_compiled(model, path)
        assert isinstance(net, torch._dynamo.eval_frame.OptimizedModule) == whole and (net is model) == (not whole)
        assert all((b._compiled_call_impl is not None) == blocks for b in model.blocks), path
    # every CUDA-graph step, whole or by blocks, begins a new step of the graph tree as training's does (eager here)
    steps = []
    argv = ["--model", "test_vit", "--img-size", "32", "--batch-size", "2", "--device", "cpu", "--warmup", "1",
            "--steps", "2", "--windows", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "_maybe_compiled", lambda model, path: model)
        mp.setattr(bench, "_counted", lambda *a: (0.0, 0))
        mp.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
        for path, marked in (("cudagraphs", 3), ("cudagraphs-blocks", 3), ("compiled-blocks", 0)):
            steps.clear()
            bench.measure_training(bench.parse_args(argv), f"rlrr+{path}")
            assert len(steps) == marked, path
    # the FLOP and DDP-byte counts of a model with compiled blocks: the eager model's, and no graph compiled for them
    from torch._dynamo.utils import counters
    eager, blocks = build_model(cfg, 4, seed=0), build_model(cfg, 4, seed=0)
    bench._maybe_compiled(blocks, "cudagraphs-blocks")
    torch._dynamo.reset()
    counters.clear()
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([1])
    assert bench._counted(blocks, x, y, None) == bench._counted(eager, x, y, None)
    assert counters["stats"]["unique_graphs"] == 0


@pytest.mark.parametrize("mode", ["dropout", "stochastic_depth"])
def test_blocks_that_differ_only_in_their_drop_path_rate_share_one_graph(mode):
    """A drop-path schedule (0 to 0.4 over 5 blocks) gives every block its own Python-float rate, on which
    torch.compile would specialise (5 graphs); held as tensors, the blocks share one. Parameter and
    state-dict names stay as they are."""
    from torch._dynamo.utils import counters

    from rlrr.compile import DropAtRate
    cfg = ModelConfig(name="test_vit", img_size=32, drop_path=0.4, drop_path_mode=mode, timm_kwargs={"depth": 5})
    model = build_model(cfg, 4, seed=0)
    names = list(model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks_in_place(model, CompilePlan(compile=True, cuda_graphs=False, cache_dir="-"),
                                   backend="aot_eager")
    model.train()(torch.randn(3, 3, 32, 32)).square().sum().backward()
    assert counters["stats"]["unique_graphs"] == 1
    drops = [(b.drop_path1, b.drop_path2) for b in model.blocks]
    per_sample = mode == "stochastic_depth"
    assert all(isinstance(d, DropAtRate) and d.per_sample == per_sample for pair in drops for d in pair)
    assert [pair[0].rate.item() for pair in drops] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert list(model.state_dict()) == names


def test_only_drop_paths_that_rescale_become_tensor_rates():
    """DropAtRate scales survivors by 1/(1-p), as timm's DropPath does by default; one built with
    scale_by_keep=False stays as it is (its blocks compile a graph each rather than train differently)."""
    import timm.layers

    from rlrr.compile import rates_as_tensors
    blocks = [torch.nn.Sequential(torch.nn.Linear(2, 2), timm.layers.DropPath(r, scale_by_keep=False))
              for r in (0.1, 0.2)]
    assert rates_as_tensors(blocks) == 0 and all(type(b[1]) is timm.layers.DropPath for b in blocks)
    for b in blocks:
        b[1].scale_by_keep = True
    assert rates_as_tensors(blocks) == 2


def test_drop_at_rate_drops_and_rescales_as_dropout_and_drop_path_do():
    """Element-wise: each value zeroed with probability p, survivors scaled by exactly 1/(1-p) in the input's
    dtype; per sample: whole samples. Evaluation passes the input through; a rate of 1 drops everything."""
    from rlrr.compile import DropAtRate
    torch.manual_seed(0)
    n, p = 200_000, 0.25
    bound = 6 * (p * (1 - p) / n) ** 0.5  # six standard deviations of the dropped fraction
    out = DropAtRate(p, per_sample=False, device=CPU)(torch.ones(n))
    scale = (torch.tensor(1.0) / (1 - torch.tensor(p))).item()
    assert set(out.unique().tolist()) == {0.0, scale}
    assert abs((out == 0).float().mean().item() - p) < bound
    samples = DropAtRate(p, per_sample=True, device=CPU)(torch.ones(n // 10, 2, 5, dtype=torch.bfloat16))
    assert samples.dtype == torch.bfloat16
    per_sample = samples.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == per_sample[:, :1]).all(1)).all()
    assert abs((per_sample[:, 0] == 0).float().mean().item() - p) < 6 * (p * (1 - p) / (n // 10)) ** 0.5
    x = torch.randn(4, 3)
    assert DropAtRate(p, per_sample=False, device=CPU).eval()(x) is x
    assert torch.equal(DropAtRate(1.0, per_sample=False, device=CPU)(x), torch.zeros(4, 3))


def _inductor_kernels(tmp_path, batch: int, methods: str) -> dict:
    """tools/inductor_kernels.py for the tests' ViT in a process of its own (it patches device queries) without
    Triton's interpreter switch (inductor needs Triton's compiler); its JSON report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor-cache")
    out = tmp_path / f"kernels-{batch}.json"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "inductor_kernels.py"), "--model", "test_vit",
                          "--img-size", "32", "--batch-size", str(batch), "--methods", methods, "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| rlrr | backward |" in res.stdout and "MB a step outside the matmuls" in res.stdout
    return {r["method"]: r for r in json.loads(out.read_text())["methods"]}


@pytest.mark.integration
def test_inductor_generates_for_a_gpu_the_same_matmuls_and_a_bounded_weight_pass_for_rlrr(tmp_path):
    """What inductor writes for one compiled block's training step on sm_90, generated on this CPU. RLRR's
    graphs make the library calls full fine-tuning's do (the forward matmul, dX and dW' per linear, and
    attention), nothing more. Its kernels' bytes over a weight (the part that does not grow with the batch:
    2x one batch's bytes less 2x's) are at most 21 per element: building W' (4 read, 2 written) and, in
    backward, two reductions each reading dW' (bf16) and W (fp32) with W' rebuilt on the way (2 + 2 x 6),
    20 in all, and under one more for the scale vectors and the split reductions' fp32 partial sums (0.5
    here); biases and norms add what they add to full fine-tuning's, whose weight pass is the bf16 cast
    forward (6) and the fp32 gradient backward (6). Writing dW' * W out in fp32 for batched products would
    add 12 per element. What the forward keeps for the backward beyond W and the input grows with the batch
    alone: no W' is kept (full fine-tuning keeps its bf16 weights)."""
    small, large = _inductor_kernels(tmp_path, 2, "rlrr,full"), _inductor_kernels(tmp_path, 4, "rlrr,full")
    rlrr, full = small["rlrr"], small["full"]
    for kind in ("forward", "backward"):
        assert sorted(rlrr["graphs"][kind]["library_calls"]) == sorted(full["graphs"][kind]["library_calls"])
    calls = full["graphs"]["forward"]["library_calls"] + full["graphs"]["backward"]["library_calls"]
    assert calls.count("addmm") == 4 and calls.count("mm") == 8 and "bmm" not in calls  # 4 linears, SDPA

    def weight_pass(method):
        batch2, batch4 = (r[method]["kernel_bytes"] for r in (small, large))
        return 2 * batch2 - batch4

    dim, hidden = 64, 192  # test_vit: qkv, proj, fc1, fc2
    weights = 3 * dim * dim + dim * dim + 2 * dim * hidden
    vectors = weight_pass("full") - 12 * weights  # biases and norms
    assert 0 <= vectors < weights  # under a byte per weight element
    assert weight_pass("rlrr") <= 21 * weights + vectors, (weight_pass("rlrr"), weights)
    assert rlrr["step_bytes"] < full["step_bytes"]  # AdamW over every weight outweighs the scale reductions

    def kept_over_weights(method):  # what the forward keeps for the backward, beyond the step's inputs
        batch2, batch4 = (r[method]["saved_bytes"] - r[method]["saved_input_bytes"] for r in (small, large))
        return 2 * batch2 - batch4

    assert kept_over_weights("full") >= 2 * weights  # a bf16 copy of each weight, for dX
    assert 0 <= kept_over_weights("rlrr") < weights // 8, (kept_over_weights("rlrr"), weights)  # no W' kept


def test_inductor_kernels_refuses_the_interpreter_unknown_architectures_methods_and_dtypes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    res = run_tool_here("inductor_kernels.py", "--arch", "75")
    assert res.returncode == 2 and "--arch 75: expected one of 80, 90, 100" in res.stderr
    res = run_tool_here("inductor_kernels.py", "--methods", "rlrr,dora")
    assert res.returncode == 2 and "--methods 'rlrr,dora': unknown dora" in res.stderr
    res = run_tool_here("inductor_kernels.py", "--precision", "fp16", "--frozen-dtype", "bf16")
    assert res.returncode == 2 and "--frozen-dtype bf16 needs --precision bf16" in res.stderr
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    res = run_tool_here("inductor_kernels.py")
    assert res.returncode == 2 and "TRITON_INTERPRET=1" in res.stderr


def test_the_kernel_report_takes_a_block_whole_and_its_input_as_training_has_it():
    """tools/inductor_kernels.py's block: every tensor kept (parameters, and buffers that are not in the state
    dict, such as Swin's relative position index and shifted-window mask) after the model ran up to it on the
    meta device; its input the size training gives it, needing a gradient only where something before it
    trains."""
    tool = tool_module("inductor_kernels.py")
    for method, needs_grad in (("rlrr", True), ("linear", False)):
        cfg = ModelConfig(name="swin_tiny_patch4_window7_224", img_size=112, method=method,
                          timm_kwargs={"depths": (2, 2, 2, 2)})
        model = build_model(cfg, 5, seed=0)
        blocks = repeated_blocks(model)
        shifted = blocks[1]
        kept = {n: t.clone() for n, t in [*shifted.named_parameters(), *shifted.named_buffers()]}
        assert any(n not in shifted.state_dict() for n in kept)  # non-persistent buffers are there to keep
        block, x = tool.block_and_input(model, 1, 3, 112)
        assert block is shifted and x.shape == (3, 28, 28, 96) and x.requires_grad == needs_grad
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            assert t.device.type == "cpu" and torch.equal(t, kept[name]), name
        assert block(x).shape == x.shape


@pytest.mark.integration  # inductor's C++ builds: 20-30 s a case with a cold cache
@pytest.mark.parametrize("scope,checkpointing", [("model", True), ("blocks", False)])
def test_compiled_training_steps_give_eager_gradients_at_every_step(scope, checkpointing):
    """Inductor (its C++ backend here), whole (with timm's activation checkpointing inside the graph; without
    it, tests/test_reliability.py trains a compiled run against the eager one) or by blocks, over AdamW steps:
    each step's gradients are eager fp32's up to summation order (1e-4 of each tensor's largest entry: the sums
    run over at most a few thousand terms, ~1e-6 apart). The second and later steps matter: with the blocks
    marked as nested compile regions (torch 2.14) the first step's gradients were right and the next ones off
    by up to 2,000x."""
    from rlrr.compile import compile_blocks_in_place
    torch._dynamo.reset()
    cfg = ModelConfig(name="test_vit", img_size=32, drop_path=0.0, grad_checkpointing=checkpointing,
                      timm_kwargs={"depth": 2})
    eager, compiled = build_model(cfg, 4, seed=0).train(), build_model(cfg, 4, seed=0).train()
    net = compiled if compile_blocks_in_place(compiled, CompilePlan(True, False, "-", scope=scope)) \
        else torch.compile(compiled)
    trained = [[p for p in m.parameters() if p.requires_grad] for m in (eager, compiled)]
    optimizers = [torch.optim.AdamW(params, lr=1e-2) for params in trained]
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 4, (4,), generator=gen)
        for model in (eager, net):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        for p, q in zip(*trained):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-4 * p.grad.abs().max().item(),
                                       msg=lambda m: f"step {step}: {m}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        with torch.no_grad():  # the same weights again: each step's gradients compared on their own
            for p, q in zip(*trained):
                q.copy_(p)
    torch._dynamo.reset()
