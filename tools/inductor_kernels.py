"""What torch.compile generates for one block's training step on an NVIDIA GPU, on a machine without one.

Training compiles each repeated block on its own (train.compile_scope: blocks, across processes) or the
whole model (one process, CUDA graphs; a whole graph may also fuse across the blocks' edges). This tool
builds the model as training does, takes one repeated block (the last, by default), and lets inductor
turn that block's forward and backward (the graphs AOTAutograd hands inductor, partitioned and
decomposed as in a training step) into the code it would run on a GPU: the Triton kernels it writes and
the library calls (cuBLAS matmuls, attention) it makes. For each method it prints the kernels, the bytes
they move by inductor's own count (each buffer a kernel reads or writes, once), and the bytes a fused
AdamW step moves for the block's trainable weights (fp32 weight, gradient and two moments read, three
written). Between methods with the same matmuls (RLRR and full fine-tuning) those bytes decide the rest
of the step. It also prints what the forward keeps for the backward (the partitioner's choice), beyond
the step's own inputs: per block, what a step's activations add to the peak memory.

    python tools/inductor_kernels.py                               # ViT-B/16, batch 64, bf16, sm_90
    python tools/inductor_kernels.py --batch-size 8 --methods rlrr,full,lora --json k.json --code-dir k/

These are inductor's figures for its generated code, not a measurement: a kernel runs at the bandwidth
it reaches, and launch overhead (which CUDA graphs remove) is not counted. The graphs are traced on CPU
(CPU autocast, whose lists agree with CUDA's for ViT's ops), then their devices are set to CUDA and
inductor generates for a CUDA device of the chosen architecture; the attention call stays the one the
CPU trace chose (one library call either way), except where the CPU has no fused attention: with an
attention bias that trains (Swin's relative position table under full fine-tuning) the CPU trace, and
so the report, has attention as matmuls and a softmax, where a GPU runs one memory-efficient call.
It patches torch's and Triton's device queries for the generation, so it runs in a process of its own,
and reads torch internals (torch._inductor, as in torch 2.14): a torch that changes them stops this
tool with an error, not the training.
"""
import argparse
import contextlib
import copy
import os
import re
import sys
import types
import typing

import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn as nn

from rlrr.atomic import write_json_atomic
from rlrr.cli import UsageError, tool_main

# compute capability -> (GPU, streaming multiprocessors): what inductor's heuristics read from the device
ARCHS = {80: ("A100", 108), 90: ("H100/H200", 132), 100: ("B200", 148)}
ADAMW_BYTES_PER_WEIGHT = 7 * 4  # fused AdamW: reads weight, gradient and two moments, writes three (fp32)
NO_GPU_TO_LOAD = "Could not find an active GPU backend"  # where generation ends: the kernels are loaded


class _BlockInput(Exception):
    """Raised with the block's positional inputs when the model reaches it."""


def block_and_input(model: nn.Module, index: int, batch: int, img_size: int, in_chans: int = 3):
    """Repeated block ``index`` (rlrr.compile.repeated_blocks: what training compiles) on CPU, and a CPU input
    of the size it gets for a batch of images, requiring a gradient where training's would (something before
    the block trains). The model runs up to the block on the meta device (shapes only), then the block gets
    its weights back."""
    from rlrr.compile import repeated_blocks
    blocks = repeated_blocks(model)
    if not blocks:
        raise UsageError(f"{type(model).__name__} has no repeated blocks to compile")
    if not -len(blocks) <= index < len(blocks):
        raise UsageError(f"--block {index}: {type(model).__name__} has {len(blocks)} repeated blocks")
    block = blocks[index]
    # every tensor, non-persistent buffers too (Swin's relative position index is one): to_empty() drops values
    tensors = {name: t.detach().clone() for name, t in [*block.named_parameters(), *block.named_buffers()]}

    def stop(module, args):
        raise _BlockInput(args)

    handle = block.register_forward_pre_hook(stop)
    model.to("meta")
    try:
        model(torch.zeros(batch, in_chans, img_size, img_size, device="meta"))
    except _BlockInput as e:
        (x,) = e.args[0]
    finally:
        handle.remove()
    block.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            t.copy_(tensors[name])
    return block, torch.zeros(x.shape).requires_grad_(x.requires_grad)


def training_graphs(block: nn.Module, x: torch.Tensor, dtype: typing.Optional[torch.dtype]) -> list:
    """[(kind, graph, example inputs)] for the forward and the backward of one training step of ``block``
    under autocast to ``dtype`` (None: none): the graphs inductor's own pipeline (torch._inductor.compile_fx) hands its
    code generator, captured on their way (a copy of each runs, uncompiled, so that the step goes on)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.output_code import OutputCode

    class Eager(OutputCode):  # runs the captured graph as it is: the step goes on, nothing compiles for the CPU
        def __init__(self, gm):
            self.gm, self._boxed_call = gm, True

        def __call__(self, inputs):
            return self.gm(*inputs)

        def post_compile(self, *args, **kwargs):
            pass

        def set_triton_bundle(self, *args):
            pass

    graphs = []

    def capture(gm, example_inputs, **kwargs):
        graphs.append(("backward" if kwargs.get("is_backward") else "forward", gm, list(example_inputs)))
        return Eager(torch.fx.GraphModule(gm, copy.deepcopy(gm.graph)))

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=lambda gm, inputs: compile_fx(gm, inputs, inner_compile=capture),
                             dynamic=False)
    no_cache = torch._functorch.config.patch(enable_autograd_cache=False)  # a cached graph skips the capture
    with no_cache, torch._inductor.config.patch(fx_graph_cache=False):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            y = compiled(x)
        if y.requires_grad:  # a frozen block below frozen layers (the linear probe) has no backward
            y.float().sum().backward()
    block.zero_grad(set_to_none=True)
    return graphs


@contextlib.contextmanager
def offline_cuda(arch: int):
    """While inside: torch and Triton answer device queries for one CUDA device of compute capability
    ``arch`` (``ARCHS``), and Triton targets it, so that inductor generates its code; nothing can run."""
    import triton
    from torch._dynamo.device_interface import CudaInterface
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    name, sms = ARCHS[arch]
    props = types.SimpleNamespace(name=f"NVIDIA {name}", major=arch // 10, minor=arch % 10,
                                  multi_processor_count=sms, regs_per_multiprocessor=65536,
                                  max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32,
                                  total_memory=80 * 2**30, L2_cache_size=50 * 2**20, gcnArchName="")

    class TargetOnly(CudaDriver):
        def __init__(self):  # no libcuda: this driver only names its target
            pass

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_current_stream(self, device=None):
            return 0

    answers = {"get_device_properties": lambda *a, **k: props,
               "get_device_capability": lambda *a, **k: divmod(arch, 10), "current_device": lambda: 0,
               "device_count": lambda: 1, "is_bf16_supported": lambda *a, **k: True}
    interface = {**answers, "is_available": lambda: True, "get_compute_capability": lambda *a, **k: arch}
    saved = [(obj, key, obj.__dict__.get(key)) for obj, keys in ((torch.cuda, answers), (CudaInterface, interface))
             for key in keys]
    for key, fn in answers.items():
        setattr(torch.cuda, key, fn)
    for key, fn in interface.items():
        setattr(CudaInterface, key, staticmethod(fn))
    saved_driver = triton.runtime.driver._active
    triton.runtime.driver.set_active(TargetOnly())
    from torch._inductor.runtime.hints import DeviceProperties
    from torch.utils import _triton
    cached = [DeviceProperties.create, _triton.has_triton]  # answered for the CPU before, for this device now
    for fn in cached:
        fn.cache_clear()
    try:
        yield
    finally:
        for obj, key, value in saved:
            if value is None:
                delattr(obj, key)
            else:
                setattr(obj, key, value)
        triton.runtime.driver._active = saved_driver
        for fn in cached:
            fn.cache_clear()


def cuda_code(gm: torch.fx.GraphModule, example_inputs: list, is_backward: bool, arch: int) -> str:
    """The Python module inductor writes for ``gm`` on a CUDA device of ``arch``: its Triton kernels and the
    wrapper that launches them. The CPU graph is moved to CUDA (device arguments), its nodes' metadata
    propagated again from fake CUDA inputs, and handed to inductor, which stops once the code is
    written (loading the kernels needs a GPU)."""
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.graph import GraphLowering
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    cuda = torch.device("cuda", 0)
    gm = torch.fx.GraphModule(gm, gm.graph)  # a copy whose device arguments can change
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device):
            node.kwargs = {**node.kwargs, "device": cuda}
    gm.recompile()
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(t):
        return mode.fake_tensor_converter.from_meta_and_device(mode, t.to("meta"), cuda) \
            if isinstance(t, torch.Tensor) else t

    inputs = [fake(t) for t in example_inputs]
    codes = []  # benchmark_kernel: each kernel then records the bytes it moves (kernel_num_gb)
    saved = GraphLowering.save_output_code
    with offline_cuda(arch), mode, torch._inductor.config.patch(benchmark_kernel=True):
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
        GraphLowering.save_output_code = staticmethod(codes.append)
        try:
            compile_fx_inner(gm, inputs, is_backward=is_backward)
        except Exception as e:
            if not codes or NO_GPU_TO_LOAD not in str(e):
                raise
        finally:
            GraphLowering.save_output_code = saved
    return codes[0]


def read_code(code: str) -> dict:
    """Kernels (name, which inductor makes of the ops it fuses, and bytes) and library calls, in launch order,
    of one inductor output module."""
    sections = re.split(r"\n# kernel path: ", code)
    info = {}
    for section in sections[1:]:
        name = re.search(r"^(\w+) = async_compile\.triton\(", section, re.M)
        if not name:
            continue
        num_gb = re.search(r"'kernel_num_gb': ([0-9.e+-]+)", section)
        if not num_gb:
            raise ValueError(f"kernel {name.group(1)} has no byte count (kernel_num_gb)")
        info[name.group(1)] = {"name": name.group(1), "bytes": round(float(num_gb.group(1)) * 1e9)}
    wrapper = re.sub(r"'{3}.*?'{3}", "", code, flags=re.S)  # the kernels' sources out: what launches them stays
    kernels, library = [], []
    for m in re.finditer(r"\b(\w+)\.run\(|\b(extern_kernels\.\w+|torch\.ops\.aten\.\w+)(?:\.\w+)?\(", wrapper):
        if m.group(1):
            if m.group(1) not in info:
                raise ValueError(f"kernel {m.group(1)} launched but not defined")
            kernels.append(info[m.group(1)])
        else:  # SDPA as the CPU trace chose it; on a GPU, flash or cuDNN attention: one call either way
            call = m.group(2).rsplit(".", 1)[-1]
            sdpa = "sdpa_backward" if "backward" in call else "sdpa"
            library.append(sdpa if "scaled_dot_product" in call else call)
    return {"kernels": kernels, "library_calls": library, "bytes": sum(k["bytes"] for k in kernels)}


def saved_nodes(backward: torch.fx.GraphModule) -> list:
    """What the forward keeps for the backward: the backward graph's inputs other than the output's gradients.
    Those named primals_* are the step's own inputs (the block's parameters and input)."""
    return [n for n in backward.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")]


def saved_for_backward(backward: torch.fx.GraphModule) -> dict:
    """Bytes the forward keeps for the backward: all of them, and those that are the step's own inputs (which
    exist anyway in a model; the rest is what the step adds to the peak)."""
    sizes = {n.name: n.meta["val"].numel() * n.meta["val"].element_size()
             if isinstance(n.meta.get("val"), torch.Tensor) else 0
             for n in saved_nodes(backward)}  # symbolic sizes: none (static)
    return {"saved_bytes": sum(sizes.values()),
            "saved_input_bytes": sum(b for name, b in sizes.items() if name.startswith("primals"))}


def block_report(method: str, args) -> dict:
    """One method's block: each graph's kernels and library calls, and the step's bytes."""
    from rlrr.config import ModelConfig
    from rlrr.engine import AMP_DTYPES
    from rlrr.model import build_model, store_frozen_weights_in

    cfg = ModelConfig(name=args.model, img_size=args.img_size, method=method, drop_path=0.0,
                      fused_attn=not args.explicit_attn, timm_kwargs={"depth": args.depth} if args.depth else {})
    torch.manual_seed(0)
    model = build_model(cfg, args.num_classes)
    if args.frozen_dtype == "bf16":  # train.frozen_dtype
        store_frozen_weights_in(model, torch.bfloat16)
    block, x = block_and_input(model, args.block, args.batch_size, args.img_size)
    dtype = AMP_DTYPES.get(args.precision)
    report = {"method": method, "block": type(block).__name__, "input": list(x.shape), "graphs": {}}
    for kind, gm, inputs in training_graphs(block, x, dtype):
        code = cuda_code(gm, inputs, kind == "backward", args.arch)
        if args.code_dir:
            os.makedirs(args.code_dir, exist_ok=True)
            with open(os.path.join(args.code_dir, f"{method}_{kind}.py"), "w") as f:
                f.write(code)
        report["graphs"][kind] = read_code(code)
        if kind == "backward":
            report.update(saved_for_backward(gm))
    trainable = sum(p.numel() for p in block.parameters() if p.requires_grad)
    report["trainable"] = trainable
    report["optimizer_bytes"] = trainable * ADAMW_BYTES_PER_WEIGHT
    report["kernel_bytes"] = sum(g["bytes"] for g in report["graphs"].values())
    report["step_bytes"] = report["kernel_bytes"] + report["optimizer_bytes"]
    return report


def print_table(reports: list, args) -> None:
    frozen = ", frozen weights in bf16" if args.frozen_dtype == "bf16" else ""
    print(f"{args.model}, batch {args.batch_size}, {args.precision}{frozen}, sm_{args.arch} ({ARCHS[args.arch][0]}): "
          f"one {reports[0]['block']}'s training step, as inductor generates it (MB by inductor's count)")
    print("| method | graph | Triton kernels | MB moved | library calls |")
    print("|---|---|---|---|---|")
    for r in reports:
        for kind, g in r["graphs"].items():
            calls = ", ".join(f"{n} x{g['library_calls'].count(n)}" for n in dict.fromkeys(g["library_calls"]))
            print(f"| {r['method']} | {kind} | {len(g['kernels'])} | {g['bytes'] / 1e6:,.1f} | {calls} |")
        print(f"| {r['method']} | AdamW ({r['trainable']:,} weights) | {int(r['trainable'] > 0)} | "
              f"{r['optimizer_bytes'] / 1e6:,.1f} | |")
    base = next((r for r in reports if r["method"] == "full"), reports[0])
    print()
    for r in reports:
        print(f"{r['method']}: {r['step_bytes'] / 1e6:,.1f} MB a step outside the matmuls "
              f"({r['step_bytes'] / base['step_bytes']:.3f}x {base['method']})")
    for r in reports:
        if "saved_bytes" in r:
            print(f"{r['method']}: {(r['saved_bytes'] - r['saved_input_bytes']) / 1e6:,.1f} MB kept for the backward "
                  f"beyond the step's inputs ({r['saved_input_bytes'] / 1e6:,.1f} MB of those kept too)")
    if args.verbose:
        for r in reports:
            for kind, g in r["graphs"].items():
                print(f"\n{r['method']} {kind}:")
                for k in g["kernels"]:
                    print(f"  {k['bytes'] / 1e6:9.2f} MB  {k['name']}")


@tool_main("inductor_kernels")
def main(argv=None) -> int:
    from rlrr.config import Precision, frozen_storage
    from rlrr.model import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--precision", choices=typing.get_args(Precision), default="bf16")
    parser.add_argument("--frozen-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="store frozen linear weights in this dtype (train.frozen_dtype; auto: bf16 with bf16, "
                             "as training; bf16 with bf16 only)")
    parser.add_argument("--methods", default="rlrr,full", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--arch", type=int, default=90, help="compute capability: " +
                        ", ".join(f"{a} {n}" for a, (n, _) in ARCHS.items()))
    parser.add_argument("--block", type=int, default=-1, help="which repeated block (default -1: the last, whose "
                        "input carries a gradient whenever anything before it trains)")
    parser.add_argument("--explicit-attn", action="store_true", help="attention as matmuls and softmax, not SDPA")
    parser.add_argument("--depth", type=int, help="build the model with this many blocks (the block is the same; "
                        "a big model builds faster)")
    parser.add_argument("--json", help="also write the report to this JSON file")
    parser.add_argument("--code-dir", help="write each generated module here, METHOD_GRAPH.py")
    parser.add_argument("--verbose", action="store_true", help="list each kernel with its bytes")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if args.frozen_dtype == "bf16" and args.precision != "bf16":
        raise UsageError("--frozen-dtype bf16 needs --precision bf16")
    args.frozen_dtype = frozen_storage(args.frozen_dtype, args.precision)
    if args.arch not in ARCHS:
        raise UsageError(f"--arch {args.arch}: expected one of {', '.join(map(str, ARCHS))}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods {args.methods!r}: unknown {', '.join(unknown)}; expected some of "
                         f"{', '.join(METHODS)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UsageError("TRITON_INTERPRET=1 replaces Triton's compiler, which inductor needs; unset it")
    if torch.cuda.is_available():
        print("inductor_kernels: a GPU is here; its real kernels are what tools/benchmark.py measures",
              file=sys.stderr)
    torch._inductor.config.compile_threads = 1
    reports = [block_report(m, args) for m in methods]
    print_table(reports, args)
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "batch_size": args.batch_size, "precision": args.precision,
                                      "frozen_dtype": args.frozen_dtype, "arch": args.arch, "methods": reports})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
