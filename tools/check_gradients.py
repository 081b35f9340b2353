#!/usr/bin/env python
"""Do the compiled and fused training paths give eager's gradients, at the sizes runs train at?

    python tools/check_gradients.py --set model.name=vit_base_patch16_224 --batch-size 64      # on a GPU
    python tools/check_gradients.py --config configs/vtab/kitti.yaml --paths cudagraphs,compiled-blocks
    python tools/check_gradients.py --set model.name=test_vit --set model.img_size=32 --batch-size 4 \\
        --device cpu --paths compiled,compiled-blocks

The unit tests compare compiled and eager gradients on tiny models, where the compiler's kernels are
small; at ViT-B/16's 12,608 tokens a batch of 64 they split their reductions, fuse reductions of
different orders (the LayerNorm, SSF and scale gradients all sum over tokens or rows) and, as CUDA
graphs, reuse memory from step to step. Silent wrong gradients from reductions of this kind have
shipped in torch releases, so this runs the training engine (rlrr.engine.DDPEngine, as launch/train.py
builds it, frozen weights stored as the config says) on each path for ``--steps`` steps of random
batches, and compares every trainable tensor's gradient with an eager float64 step of the same model
from the same weights (drop path off: its random draws differ between paths), then the evaluation
forward's logits. After each step every path takes the reference's AdamW update, so each step is
compared on its own, and the second and later steps show a graph that reads last step's memory.

The bound comes from the arithmetic: the eager step with torch's ops in the same precision (bf16 or
fp16 autocast, fp16's gradients unscaled, or fp32) has its own error against float64 on each tensor,
from its roundings; a compiled or fused step rounds at other points and sums in other orders, so it may
err by a few times as much, not by orders of magnitude. Error = max |g - g_ref| / max |g_ref| per
tensor; a path passes where every tensor's error is at most 8x eager's plus two unit roundoffs of the
precision (bf16: 2^-7, fp16: 2^-10, fp32: 2^-23). A gradient left unwritten, stale or read from
overwritten memory is off by O(1).

Paths as tools/benchmark.py names them: eager (model.kernel auto: the Triton kernels on CUDA), fused
(model.kernel triton), compiled and cudagraphs (the whole model; cudagraphs is a one-process run's
default on a GPU), compiled-blocks and cudagraphs-blocks (each block; compiled-blocks is the default
across processes). Writes ``--json`` and exits 1 when a path exceeds its bound or fails.
"""
import argparse
import math
import sys
import time
import traceback

import torch
from torch._dynamo.utils import counters

from rlrr.adapter import trainable_parameters
from rlrr.atomic import write_json_atomic
from rlrr.compile import compile_plan
from rlrr.config import ConfigError, load_config
from rlrr.distributed import DistInfo
from rlrr.engine import DDPEngine
from rlrr.model import build_model, store_frozen_weights_as_configured

PATHS = {  # path -> the run config it takes (train.compile, train.cuda_graphs, train.compile_scope, model.kernel)
    "torch": ["train.compile=false", "model.kernel=torch"],
    "eager": ["train.compile=false"],
    "fused": ["train.compile=false", "model.kernel=triton"],
    "compiled": ["train.compile=true", "train.cuda_graphs=false", "train.compile_scope=model"],
    "cudagraphs": ["train.compile=true", "train.cuda_graphs=true", "train.compile_scope=model"],
    "compiled-blocks": ["train.compile=true", "train.cuda_graphs=false", "train.compile_scope=blocks"],
    "cudagraphs-blocks": ["train.compile=true", "train.cuda_graphs=true", "train.compile_scope=blocks"],
}
FLOOR = "torch"  # eager torch ops in the precision under test: the errors its roundings make set the bound
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11, "fp32": 2.0 ** -24}
FACTOR = 8.0  # how many times eager's error a reordered, differently rounded step may make


def relative_error(g: torch.Tensor, ref: torch.Tensor) -> float:
    """max |g - ref| / max |ref| (0 where both are zero, inf where only the reference is)."""
    diff = (g.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def verdict(errors: dict, floor: dict, precision: str) -> dict:
    """A path's errors per tensor (name -> error) against the floor's: the worst error over its bound, the
    tensors over it, and the tensor that came closest."""
    slack = 2 * UNIT_ROUNDOFF[precision]
    ratios = {n: e / (FACTOR * floor[n] + slack) for n, e in errors.items()}
    worst = max(ratios, key=ratios.get)
    return {"worst_ratio": round(ratios[worst], 4), "worst_tensor": worst, "worst_error": errors[worst],
            "floor_error": floor[worst], "over_bound": sorted(n for n, r in ratios.items() if r > 1.0)}


def _config(args, method: str, path: str, precision: str):
    # drop path off: its random draws differ between an eager and a compiled step
    return load_config(args.config, ["data.shards=unused", *args.set, "model.drop_path=0", f"model.method={method}",
                                     f"train.precision={precision}", f"train.batch_size={args.batch_size}",
                                     "train.grad_accum=1", *PATHS[path]])


@torch.no_grad()
def _prepare(model: torch.nn.Module, seed: int) -> None:
    """Frozen floating-point weights rounded to bf16 values (so bf16 storage holds the reference's exact
    weights) and a random head (the methods start from a zero head, which would leave the backbone
    without a gradient at the first step)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.copy_(p.to(torch.bfloat16))
    gen = torch.Generator().manual_seed(seed)
    for p in model.get_classifier().parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _model(args, method: str, path: str, precision: str):
    """(run config, model): the same weights on every path (the config's seed, then _prepare)."""
    cfg = _config(args, method, path, precision)
    model = build_model(cfg.model, args.num_classes, seed=cfg.train.seed)
    _prepare(model, cfg.train.seed)
    return cfg, model


def _batch(args, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Random float64 images on ``device`` (each path gets them as float32, as the loop hands them over)."""
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen, dtype=torch.float64)
    return images.to(device)


def build(args, method: str, path: str, precision: str, device: torch.device):
    """(engine, the run config's compile plan) for one path, as launch/train.py builds them."""
    cfg, model = _model(args, method, path, precision)
    info = DistInfo(device=device)
    store_frozen_weights_as_configured(model, cfg.train)
    plan = compile_plan(cfg, info)
    for note in plan.notes:
        print(f"{path}: {note}", file=sys.stderr)
    return DDPEngine(model, cfg, info, plan), plan


def reference(args, method: str, device: torch.device):
    """The eager float64 model (torch's ops) and its optimizer."""
    _, model = _model(args, method, FLOOR, "fp32")
    model = model.to(device, torch.float64).train()
    params = [p for _, p in trainable_parameters(model)]
    return model, torch.optim.AdamW(params, lr=args.lr, foreach=False)


EVAL = "eval logits"  # the evaluation forward's output, checked beside the gradients


@torch.no_grad()
def evaluated(ref, engines: dict, errors: dict, failed: dict, args, device, gen) -> None:
    """The evaluation forward (eval mode, no autograd: what rlrr.evaluate runs, a graph of its own when
    compiled) on one more batch, its logits against the reference's as entry EVAL of ``errors``."""
    images = _batch(args, gen, device)
    want = ref.eval()(images)
    for path, engine in list(engines.items()):
        try:
            engine.model.eval()
            errors[path][EVAL] = relative_error(engine.forward(images.float()), want)
        except Exception as e:
            failed[path] = f"evaluation: {type(e).__name__}: {e}".splitlines()[0]
            traceback.print_exc()
            del engines[path]


def compared_step(engine, images, labels, ref_loss, ref_grads: dict) -> tuple[float, dict]:
    """One training forward and backward of ``engine`` (float32 inputs, as the loop hands them over): the
    loss's error and each trainable tensor's gradient error against the reference's; the gradients are
    then dropped (the step itself is the reference's)."""
    loss, _ = engine.backward(images.float(), labels, last_micro=True)
    errors = {}
    for n, p in trainable_parameters(engine.model):
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        if engine.scaler.is_enabled():  # fp16: the gradients of the loss times the scaler's scale
            grad = grad / engine.scaler.get_scale()
        errors[n] = relative_error(grad, ref_grads[n])
    engine.discard()
    return relative_error(loss, ref_loss.detach()), errors


def check_method(args, method: str, device: torch.device) -> dict:
    ref, ref_opt = reference(args, method, device)
    names = [n for n, _ in trainable_parameters(ref)]
    engines, failed, plans = {}, {}, {}
    for path in dict.fromkeys([FLOOR, *args.paths]):
        try:
            engines[path], plan = build(args, method, path, args.precision, device)
            plans[path] = plan.to_dict()
        except (ConfigError, ValueError, RuntimeError) as e:
            failed[path] = f"{type(e).__name__}: {e}".splitlines()[0]
    errors = {path: dict.fromkeys(names, 0.0) for path in engines}  # each tensor's largest over the steps
    loss_errors = {path: 0.0 for path in engines}
    gen = torch.Generator().manual_seed(1)
    graphs = {}
    for step in range(args.steps):
        images = _batch(args, gen, device)
        labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(device)
        ref_loss = torch.nn.functional.cross_entropy(ref(images), labels)
        ref_loss.backward()
        ref_grads = {n: p.grad for n, p in trainable_parameters(ref)}
        for path, engine in list(engines.items()):
            try:
                counters.clear()
                loss_error, step_errors = compared_step(engine, images, labels, ref_loss, ref_grads)
                graphs.setdefault(path, {"graphs": counters["stats"]["unique_graphs"],
                                         "graph_breaks": sum(counters["graph_break"].values())})
                loss_errors[path] = max(loss_errors[path], loss_error)
                errors[path] = {n: max(e, step_errors[n]) for n, e in errors[path].items()}
            except Exception as e:  # the other paths still run; this one is listed with its error
                failed[path] = f"step {step}: {type(e).__name__}: {e}".splitlines()[0]
                traceback.print_exc()
                del engines[path]
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # every path from the reference's new weights
            updated = dict(trainable_parameters(ref))
            for engine in engines.values():
                for n, p in trainable_parameters(engine.model):
                    p.copy_(updated[n])
    evaluated(ref, engines, errors, failed, args, device, gen)
    out = {"paths": {}, "failed": failed, "plans": plans}
    if FLOOR not in engines:
        return out
    floor = errors[FLOOR]
    for path in engines:
        if path == FLOOR:
            continue
        out["paths"][path] = {**verdict(errors[path], floor, args.precision), "loss_error": loss_errors[path],
                              "eval_error": errors[path].get(EVAL), "floor_eval_error": floor.get(EVAL),
                              **graphs.get(path, {})}
    out["floor"] = {"path": FLOOR, "worst_error": max(floor.values()), "loss_error": loss_errors[FLOOR]}
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a run config (its model section is the model checked)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, as training's")
    ap.add_argument("--methods", default="rlrr",
                    help="comma-separated model.method values (rlrr, full, ssf, lora, bitfit, linear)")
    ap.add_argument("--paths", help=f"comma-separated, of {', '.join(p for p in PATHS if p != FLOOR)} (default: "
                                    "cudagraphs,compiled-blocks,fused on CUDA, compiled,compiled-blocks on CPU)")
    ap.add_argument("--precision", choices=tuple(UNIT_ROUNDOFF), default="bf16")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-classes", type=int, default=100, help="where the config sets no data.num_classes")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3, help="the reference's AdamW step between compared steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    default = "cudagraphs,compiled-blocks,fused" if cuda else "compiled,compiled-blocks"
    args.paths = (args.paths or default).split(",")
    unknown = [p for p in args.paths if p not in PATHS or p == FLOOR]
    if unknown:
        ap.error(f"--paths: unknown path {unknown[0]!r}; expected some of {', '.join(p for p in PATHS if p != FLOOR)}")
    args.methods = args.methods.split(",")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        cfg = _config(args, args.methods[0], FLOOR, "fp32")
        args.img_size, args.num_classes = cfg.model.img_size, cfg.data.num_classes or args.num_classes
    except ConfigError as e:
        print(f"check_gradients: error: {e}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    t0 = time.perf_counter()
    results = {"config": {k: getattr(args, k) for k in ("config", "set", "precision", "batch_size", "steps", "lr")},
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "bound": f"{FACTOR:g} x the {FLOOR} path's error + 2 unit roundoffs",
               "methods": {}}
    ok = True
    for method in args.methods:
        try:
            r = check_method(args, method, device)
        except ConfigError as e:  # e.g. a missing pre-trained file: no model to compare
            print(f"check_gradients: error: {e}", file=sys.stderr)
            return 2
        results["methods"][method] = r
        ok = ok and not r["failed"] and all(not p["over_bound"] for p in r["paths"].values())
        for path, p in r["paths"].items():
            over = f"OVER THE BOUND: {', '.join(p['over_bound'][:5])}" if p["over_bound"] else "within the bound"
            print(f"{method}+{path}: worst {p['worst_ratio']:.3f} of its bound ({p['worst_tensor']}: error "
                  f"{p['worst_error']:.3g}, {FLOOR} {p['floor_error']:.3g}), loss error {p['loss_error']:.3g}, "
                  f"eval logits error {p['eval_error']:.3g} ({FLOOR} {p['floor_eval_error']:.3g}), "
                  f"{p.get('graphs', 0)} graph(s), {p.get('graph_breaks', 0)} break(s): {over}")
        for path, error in r["failed"].items():
            print(f"{method}+{path}: FAILED {error}")
    results.update(ok=ok, seconds=round(time.perf_counter() - t0, 1))
    if args.json:
        write_json_atomic(args.json, results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
