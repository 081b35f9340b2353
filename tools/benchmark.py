#!/usr/bin/env python
"""Training and inference speed and peak memory: RLRR vs full fine-tuning vs linear probe (vs LoRA
when HF peft is installed), each training mode in a fresh process so peak memory is its own.

    python tools/benchmark.py --model vit_base_patch16_224 --batch-size 8 --precision fp32 --device cpu
    python tools/benchmark.py --model vit_huge_patch14_224 --batch-size 64 --precision bf16 --device cuda

A mode is a method and, after a "+", how its step runs: eager (the default), fused (RLRR only: its
Triton kernels, model.kernel=triton), torch (RLRR only: eager torch ops, model.kernel=torch),
compiled (torch.compile of the whole model) or cudagraphs (torch.compile's "reduce-overhead": compiled
and replayed as CUDA graphs: what a one-process training run does by default on a GPU), and
compiled-blocks / cudagraphs-blocks the same with each repeated block compiled on its own
(train.compile_scope: blocks; a compiled run without CUDA graphs, across processes, takes
compiled-blocks by default). On a GPU the default
modes put timm full fine-tuning (eager, compiled, CUDA graphs), the linear probe and LoRA beside every
RLRR path; "best rlrr vs best full" compares the fastest of each.

Training img/s: forward + backward + AdamW step on random data, after warm-up, median over timed
windows; warm-up seconds (compiling and recording CUDA graphs included) per mode and round. Each mode
runs in its own fresh process, and the modes run in ``--rounds`` alternating rounds whose windows are
pooled, so a machine that slows down mid-run does not favour one mode.
Peak memory: CUDA max allocated, or on CPU the peak RSS growth over the process's RSS after
imports (the largest over rounds). FLOPs: one image's forward and backward as torch's FlopCounterMode
counts them; MFU = FLOPs x img/s / the GPU's dense bf16/fp16 peak (known GPUs or --peak-tflops).
DDP bytes: what DistributedDataParallel hands to all-reduce in one step (counted by a comm hook on
a one-process gloo group). Inference img/s: the RLRR-adapted model, then the merged and the plain
timm model with their windows interleaved.

``--json`` is rewritten after every mode ("complete": false until the end), so a run cut short keeps
what it measured; a mode that fails is listed under "failed" with its error, the others still run, and
the command exits 1.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import typing

import torch
import yaml

from rlrr.atomic import write_json_atomic
from rlrr.config import FrozenDtype, ModelConfig, Precision, frozen_storage
from rlrr.distributed import peak_memory_mb, status_mb
from rlrr.profiling import describe, start_profiler, summary, synchronizer, tables
from rlrr.startup import long_lived_imports

METHODS = ("rlrr", "full", "linear", "lora")
PATHS = ("eager", "fused", "torch", "compiled", "cudagraphs", "compiled-blocks", "cudagraphs-blocks")
CPU_MODES = METHODS  # each method, eager
# most telling first, for a run cut short: RLRR's default path in a one-process run (the whole model as CUDA graphs),
# the full fine-tuning steps it is judged against (compiled, and with CUDA graphs: the faster at small batches),
# RLRR's default across processes (compiled by blocks), RLRR's graphs by blocks, today's eager RLRR, then the rest
GPU_MODES = ("rlrr+cudagraphs", "full+compiled", "full+cudagraphs", "rlrr+compiled-blocks", "rlrr+cudagraphs-blocks",
             "rlrr+torch", "rlrr+fused", "full", "linear", "lora")
DEFAULT_COMPILED = "compiled-blocks"  # --compile: what train.compile does without CUDA graphs (compile_scope auto)


def parse_mode(mode: str, compile_all: bool = False) -> tuple[str, str]:
    """(method, path) of a mode name such as "rlrr+fused"; ValueError naming what is wrong."""
    method, _, path = mode.partition("+")
    path = path or (DEFAULT_COMPILED if compile_all else "eager")
    if method not in METHODS or path not in PATHS or (path in ("fused", "torch") and method != "rlrr"):
        raise ValueError(mode)
    return method, path


def _model(args, method, path="eager"):
    """The model training builds (rlrr.model.build_model) for a mode; LoRA is peft on the full model."""
    from rlrr.model import build_model
    kernel = {"fused": "triton", "torch": "torch"}.get(path, "auto")
    cfg = ModelConfig(name=args.model, img_size=args.img_size, method="full" if method in ("lora", "plain") else method,
                      fused_attn=not args.explicit_attn, kernel=kernel,
                      grad_checkpointing=args.grad_checkpointing and method != "plain", timm_kwargs=args.timm_kwargs)
    model = build_model(cfg, args.num_classes)
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["qkv"],
                                                 modules_to_save=[model.default_cfg["classifier"]]))
    return model


def _maybe_compiled(model, path):
    """The model to call for ``path``, compiled as training compiles it (rlrr.compile); the compile happens
    in the warm-up calls, which are not timed."""
    from rlrr.compile import CompilePlan, compile_blocks_in_place
    kind, _, scope = path.partition("-")
    if kind not in ("compiled", "cudagraphs"):
        return model
    plan = CompilePlan(compile=True, cuda_graphs=kind == "cudagraphs", cache_dir="", scope=scope or "model")
    if compile_blocks_in_place(model, plan):
        return model
    return torch.compile(model, mode=plan.mode)


def _timed(args, steps: dict, device, warmup_s: typing.Optional[dict] = None) -> dict:
    """img/s of each of ``steps`` over ``args.windows`` windows of ``args.steps`` calls, after
    ``args.warmup`` calls each (their seconds go to ``warmup_s``); the windows of different steps alternate."""
    sync = synchronizer(device)
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync()
        if warmup_s is not None:
            warmup_s[name] = round(time.perf_counter() - t0, 2)
    rates = {name: [] for name in steps}
    for _ in range(args.windows):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
    return rates


def _profiled(step, steps: int, device) -> str:
    """torch.profiler over ``steps`` more steps (rlrr.profiling): the time per step, the device's busy share
    (a low one: the step waits on Python and launches), and the ops and kernels that took the time."""
    sync = synchronizer(device)
    sync()
    prof, t0 = start_profiler(device), time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall_s = time.perf_counter() - t0
    prof.stop()
    return describe(summary(prof, steps, wall_s, device)) + "\n" + tables(prof, device)


def _ddp_allreduce_bytes(model, x, y, dtype) -> int:
    """Bytes DDP all-reduces for one backward of ``model`` (gradients of trainable parameters), under the
    step's autocast (frozen weights stored in bf16 need it, as in training)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    counted = []

    def count(state, bucket):
        counted.append(bucket.buffer().numel() * bucket.buffer().element_size())
        done = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            ddp = DistributedDataParallel(model)
            ddp.register_comm_hook(None, count)
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
        finally:
            dist.destroy_process_group()
    model.zero_grad(set_to_none=True)
    return sum(counted)


def _train_flops_per_image(net, x, y, dtype) -> float:
    """FLOPs of one image's forward and backward, as torch's FlopCounterMode counts the matmuls and
    convolutions (activation checkpointing's recomputed forward included)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _counted(model, x, y, dtype) -> tuple[float, int]:
    """(FLOPs per image, DDP bytes per step) of ``model`` run eagerly, blocks compiled in place included: the
    counter sees every matmul, and a one-image batch compiles no graph of its own."""
    with torch.compiler.set_stance("force_eager"):
        return _train_flops_per_image(model, x, y, dtype), _ddp_allreduce_bytes(model, x, y, dtype)


# dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) of the GPUs the MFU column knows
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(args) -> typing.Optional[float]:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device.startswith("cuda") and args.precision in ("bf16", "fp16"):
        name = torch.cuda.get_device_name()
        return next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)
    return None


def measure_training(args, mode) -> dict:
    from rlrr.engine import AMP_DTYPES
    method, path = parse_mode(mode, args.compile)
    device = torch.device(args.device)
    base_mb = status_mb() if device.type == "cpu" else 0.0
    marks = [time.perf_counter()]  # phase boundaries: where a mode's seconds go besides the timed windows
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with device:  # built and initialised where it runs: ViT-H's random init takes seconds on a CPU
        model = _model(args, method, path)
    if args.frozen_dtype == "bf16":  # train.frozen_dtype; a no-op for full fine-tuning (nothing is frozen)
        from rlrr.model import store_frozen_weights_in
        store_frozen_weights_in(model, torch.bfloat16)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as training's DDP engine, for every method
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    dtype = AMP_DTYPES.get(args.precision)

    net = _maybe_compiled(model, path)
    marks.append(time.perf_counter())

    def step():
        if path.startswith("cudagraphs"):  # a new training step: the last one's graph outputs are not read again
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warmup_s = {}
    from torch._dynamo.utils import counters
    counters.clear()
    rates = _timed(args, {mode: step}, device, warmup_s)[mode]
    # each break splits a compiled graph, and the code between its pieces runs eagerly (0 when not compiled)
    graph_breaks = sum(counters["graph_break"].values())
    # a compiled graph that inductor could not record as a CUDA graph runs its kernels launch by launch (the
    # reason is logged with TORCH_LOGS=perf_hints)
    cudagraph_skips = counters["inductor"]["cudagraph_skips"]
    peak = peak_memory_mb(device) - base_mb
    marks.append(time.perf_counter())
    if args.profile:
        print(_profiled(step, args.profile, device), file=sys.stderr)
    marks.append(time.perf_counter())
    flops, ddp_bytes = _counted(model, x[:1], y[:1], dtype)
    marks.append(time.perf_counter())
    phases = dict(zip(("build", "warmup_and_windows", "profile", "count"), (b - a for a, b in zip(marks, marks[1:]))))
    return {"mode": mode, "window_img_s": rates, "warmup_s": [warmup_s[mode]], "peak_memory_mb": round(peak, 1),
            "train_flops_per_image": int(flops), "trainable_params": sum(p.numel() for p in params),
            "ddp_allreduce_bytes": ddp_bytes, "graph_breaks": graph_breaks, "cudagraph_skips": cudagraph_skips,
            "phase_s": {k: round(v, 2) for k, v in phases.items()},
            "param_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)}


@torch.no_grad()
def measure_inference(args) -> dict:
    from rlrr import merge_rlrr
    from rlrr.engine import AMP_DTYPES
    device = torch.device(args.device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    dtype = AMP_DTYPES.get(args.precision)
    def step(model):
        net = _maybe_compiled(model, DEFAULT_COMPILED if args.compile else "eager")

        def run():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                net(x)
        return run

    with device:
        model = _model(args, "rlrr").eval()
    rates = _timed(args, {"adapted": step(model)}, device)
    merged = merge_rlrr(model)
    with device:
        plain = _model(args, "plain").eval()
    rates.update(_timed(args, {"merged": step(merged), "plain": step(plain)}, device))
    out = {f"infer_{name}_img_s": round(statistics.median(r), 2) for name, r in rates.items()}
    out["merged_vs_plain"] = round(out["infer_merged_img_s"] / out["infer_plain_img_s"], 3)
    return out


def print_summary(args, results: dict) -> None:
    print(f"{args.model} {args.img_size}px batch {args.batch_size} {args.precision} on {args.device}"
          f"{' (torch.compile)' if args.compile else ''}"
          f"{', activation checkpointing' if args.grad_checkpointing else ''}"
          f"{', frozen weights in bf16' if args.frozen_dtype == 'bf16' else ''}"
          f"{', explicit attention' if args.explicit_attn else ''}")
    print(f"{'mode':22s} {'train img/s':>12s} {'warm-up s':>10s} {'peak MB':>10s} {'params MB':>10s} "
          f"{'trainable':>12s} {'DDP MB/step':>12s} {'GFLOP/img':>10s} {'MFU':>6s}")
    for mode, r in results["training"].items():
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        print(f"{mode:22s} {r['train_img_s']:12.2f} {r['warmup_s'][0]:10.1f} {r['peak_memory_mb']:10.1f} "
              f"{r['param_mb']:10.1f} {r['trainable_params']:12,d} {r['ddp_allreduce_bytes'] / 1e6:12.2f} "
              f"{r['train_flops_per_image'] / 1e9:10.3f} {mfu}"
              + (f"  ({r['graph_breaks']} graph breaks)" if r.get("graph_breaks") else "")
              + (f"  ({r['cudagraph_skips']} graphs not recorded as CUDA graphs)" if r.get("cudagraph_skips") else ""))
    inf = results.get("inference")
    if inf:
        print(f"inference img/s: adapted {inf['infer_adapted_img_s']:.2f}, merged {inf['infer_merged_img_s']:.2f}, "
              f"plain timm {inf['infer_plain_img_s']:.2f} (merged/plain {inf['merged_vs_plain']:.3f})")
    if "rlrr_vs_full" in results:
        ratio = results["rlrr_vs_full"]
        print(f"best rlrr ({ratio['rlrr_mode']}) vs best full ({ratio['full_mode']}): speed {ratio['speed']:.3f}x, "
              f"memory {ratio['memory']:.3f}x")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--timm-kwargs", type=timm_kwargs, default={}, metavar="KEY=VALUE,...",
                    help="more arguments for timm.create_model (model.timm_kwargs), e.g. embed_dim=32,num_heads=1: "
                         "a model's structure with little of its arithmetic, to measure what a step costs the host")
    ap.add_argument("--precision", choices=typing.get_args(Precision), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", help=f"training modes to measure, METHOD[+PATH] with METHOD in {','.join(METHODS)} "
                    f"and PATH in {','.join(PATHS)} (default: {','.join(CPU_MODES)} on CPU, {','.join(GPU_MODES)} "
                    "on CUDA)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every mode without a +PATH, and the inference models, by blocks "
                         "(train.compile without CUDA graphs, with its default train.compile_scope)")
    ap.add_argument("--frozen-dtype", choices=typing.get_args(FrozenDtype), default="auto",
                    help="store frozen linear weights in this dtype (train.frozen_dtype; auto: bf16 with --precision "
                         "bf16, as training; bf16 needs --precision bf16)")
    ap.add_argument("--explicit-attn", action="store_true",
                    help="explicit softmax attention instead of SDPA everywhere (model.fused_attn=false)")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="activation checkpointing (model.grad_checkpointing)")
    ap.add_argument("--peak-tflops", type=float,
                    help="the device's peak TFLOP/s for MFU (default: known GPUs in bf16/fp16)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed window")
    ap.add_argument("--windows", type=int, default=3, help="timed windows per mode and round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the training modes")
    ap.add_argument("--no-inference", action="store_true", help="training figures only")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after timing, profile this many steps of each training mode: the kernels that took the "
                         "device's time and its busy share, in the mode's log (--log-dir)")
    ap.add_argument("--log-dir", help="keep each worker's stderr here as MODE.log (compiler warnings, --profile)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def timm_kwargs(text: str) -> dict:
    """``KEY=VALUE,...`` as a dict, each value read as YAML (numbers, booleans, strings)."""
    items = [item.partition("=") for item in text.split(",") if item]
    bad = [key + eq + value for key, eq, value in items if not key or not eq]
    if bad:
        raise argparse.ArgumentTypeError(
            f"{bad[0]!r}: expected KEY=VALUE[,KEY=VALUE...], e.g. embed_dim=32,num_heads=1")
    return {key: yaml.safe_load(value) for key, _, value in items}


def _valid_mode(mode: str) -> bool:
    try:
        parse_mode(mode)
    except ValueError:
        return False
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.frozen_dtype == "bf16" and args.precision != "bf16":
        print("benchmark: error: --frozen-dtype bf16 needs --precision bf16", file=sys.stderr)
        return 2
    args.frozen_dtype = frozen_storage(args.frozen_dtype, args.precision)
    torch.manual_seed(0)
    if args.worker:  # one measurement in this fresh process, printed as the last line
        # the training stack (timm, torchvision, torch._dynamo) in the measuring process only, before its RSS
        # is read, with the collector paused (rlrr.startup)
        with long_lived_imports():
            import rlrr.engine  # noqa: F401
        result = measure_inference(args) if args.worker == "inference" else measure_training(args, args.worker)
        print(json.dumps(result))
        return 0
    default = GPU_MODES if args.device.startswith("cuda") else CPU_MODES
    modes = [m for m in (args.modes.split(",") if args.modes else default) if m]
    unknown = [m for m in modes if not _valid_mode(m)]
    if unknown:
        print(f"benchmark: error: unknown mode(s) {unknown}; METHOD[+PATH] with METHOD in {','.join(METHODS)} "
              f"and PATH in {','.join(PATHS)} (fused and torch: rlrr only)", file=sys.stderr)
        return 2
    if importlib.util.find_spec("peft") is None:  # found, not imported: only the lora worker imports it
        if any(parse_mode(m)[0] == "lora" for m in modes):
            print("benchmark: peft is not installed; skipping lora", file=sys.stderr)
            modes = [m for m in modes if parse_mode(m)[0] != "lora"]
    if args.grad_checkpointing:  # what training falls back from (rlrr.compile.graphs_blocked)
        from rlrr.compile import graphs_blocked
        why = graphs_blocked("blocks", True)
        blocked = [m for m in modes if parse_mode(m, args.compile)[1] == "cudagraphs-blocks"]
        if blocked:
            print(f"benchmark: skipping {','.join(blocked)}: {why}", file=sys.stderr)
            modes = [m for m in modes if m not in blocked]
    if not modes:
        print("benchmark: error: no training mode left to measure", file=sys.stderr)
        return 2
    shared = ["--model", args.model, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
              "--num-classes", str(args.num_classes), "--precision", args.precision, "--device", args.device,
              "--frozen-dtype", args.frozen_dtype, "--warmup", str(args.warmup), "--steps", str(args.steps),
              "--windows", str(args.windows), "--profile", str(args.profile),
              "--timm-kwargs", ",".join(f"{k}={json.dumps(v)}" for k, v in args.timm_kwargs.items())]
    shared += [flag for flag, on in (("--compile", args.compile), ("--explicit-attn", args.explicit_attn),
                                     ("--grad-checkpointing", args.grad_checkpointing)) if on]
    results = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "worker", "log_dir")},
               "torch": torch.__version__, "timm": importlib.metadata.version("timm"), "training": {}, "failed": {},
               "complete": False}
    for worker in modes * max(1, args.rounds) + ([] if args.no_inference else ["inference"]):
        started = time.perf_counter()
        res = subprocess.run([sys.executable, os.path.abspath(__file__), *shared, "--worker", worker],
                             capture_output=True, text=True)
        process_s = round(time.perf_counter() - started, 2)  # the phases plus start, imports and exit
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            with open(os.path.join(args.log_dir, f"{worker}.log"), "a") as f:
                f.write(res.stderr)
        if res.returncode != 0:  # the other modes still run
            results["failed"][worker] = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1][:300]
            print(f"benchmark: error: {worker} failed: {results['failed'][worker]}", file=sys.stderr)
        else:
            add_result(results, worker, {**json.loads(res.stdout.strip().splitlines()[-1]), "process_s": [process_s]})
        summarize(args, results)
        if args.json:  # after every mode: a run cut short keeps what it measured
            write_json_atomic(args.json, results)
    results["complete"] = True
    print_summary(args, results)
    if args.json:
        write_json_atomic(args.json, results)
    return 1 if results["failed"] else 0


def add_result(results: dict, worker: str, data: dict) -> None:
    train = results["training"]
    if worker == "inference":
        results["inference"] = data
    elif worker in train:  # a later round: pool its windows, keep the larger peak
        train[worker]["window_img_s"] += data["window_img_s"]
        train[worker]["warmup_s"] += data["warmup_s"]  # each round's, in order (later rounds: compile cache filled)
        train[worker]["process_s"] += data["process_s"]
        train[worker]["peak_memory_mb"] = max(train[worker]["peak_memory_mb"], data["peak_memory_mb"])
    else:
        train[worker] = data


def summarize(args, results: dict) -> None:
    """Each mode's img/s and MFU, and the best RLRR mode against the best full fine-tuning mode, from the
    windows measured so far."""
    train, peak = results["training"], peak_tflops(args)
    for r in train.values():
        r["train_img_s"] = round(statistics.median(r["window_img_s"]), 2)
        # model FLOPs utilisation: counted FLOPs per image x img/s over the GPU's peak (None: peak unknown)
        r["mfu"] = round(r["train_flops_per_image"] * r["train_img_s"] / (peak * 1e12), 4) if peak else None
    best = {method: max((m for m in train if parse_mode(m, args.compile)[0] == method),
                        key=lambda m: train[m]["train_img_s"], default=None) for method in ("rlrr", "full")}
    if best["rlrr"] and best["full"]:
        rlrr, full = train[best["rlrr"]], train[best["full"]]
        results["rlrr_vs_full"] = {"speed": round(rlrr["train_img_s"] / full["train_img_s"], 3),
                                   "memory": round(rlrr["peak_memory_mb"] / full["peak_memory_mb"], 3),
                                   "rlrr_mode": best["rlrr"], "full_mode": best["full"]}


if __name__ == "__main__":
    sys.exit(main())
