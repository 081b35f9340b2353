"""Compile rlrr's Triton kernels (rlrr/layers/fused.py) for NVIDIA GPUs on a machine without one.

Triton's interpreter (``make test``) checks what the kernels compute, on CPU, but it runs them as
Python and never builds them: a kernel can pass there and fail to build for a GPU. This tool records
the launches that RLRRLinear's training step makes (forward and backward, for every form, rank, side,
qkv grouping, storage and compute dtype; the launches are recorded, not run) and compiles each distinct
variant with Triton's own compiler, specialised as a launch would be, down to a cubin for each GPU
architecture asked for. It prints each variant's registers, spilled bytes and shared memory, and exits
1 naming any variant that did not build.

    python tools/compile_kernels.py                 # sm_80 (A100), sm_90 (H100/H200)
    python tools/compile_kernels.py --arch 90,100 --json kernels.json

It reads Triton's launch binder (triton.runtime.jit, Triton 3.x), so a Triton that changes it stops
this tool with one line, not the kernels.
"""
import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn

from rlrr.atomic import write_json_atomic
from rlrr.cli import UsageError, tool_main

MIN_ARCH, MAX_ARCH = 70, 121  # Volta to Blackwell (sm_121, DGX Spark)
# (out, in, in_groups, rank, sides, form, frozen storage dtype, compute dtype): each option of the layer at least
# once, at ViT-B's shapes and at ones that are not multiples of the tiles or of 16
LAYERS = [
    (2304, 768, 3, 1, "both", "residual", torch.float32, torch.bfloat16),   # ViT-B attn.qkv, the default
    (3072, 768, 1, 1, "both", "residual", torch.bfloat16, torch.bfloat16),  # frozen weights in bf16
    (768, 3072, 1, 1, "both", "residual", torch.float32, torch.float16),    # fp16 with the gradient scaler
    (96, 70, 3, 2, "both", "plain", torch.float32, torch.bfloat16),
    (33, 260, 1, 3, "both", "additive", torch.bfloat16, torch.float32),     # no autocast
    (40, 150, 1, 1, "out", "residual", torch.float32, torch.bfloat16),
    (72, 33, 3, 1, "in", "plain", torch.float32, torch.float16),
    (64, 64, 1, 4, "both", "residual", torch.float32, torch.bfloat16),
]


@contextlib.contextmanager
def recorded_launches(launches: list):
    """While inside: fused.py's kernels are recorded, (kernel, args, constexprs), instead of launched, and
    its CUDA check passes for CPU tensors (nothing runs on them)."""
    from rlrr.layers import fused

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **constexprs: launches.append((self.kernel, args, constexprs))

    saved = fused._rescale_kernel, fused._scale_grad_kernel, fused.check_device
    fused._rescale_kernel, fused._scale_grad_kernel = Recorder(saved[0]), Recorder(saved[1])
    fused.check_device = lambda t: None
    try:
        yield
    finally:
        fused._rescale_kernel, fused._scale_grad_kernel, fused.check_device = saved


def training_launches() -> list:
    """(kernel, args, constexprs) of one forward and backward of each layer in LAYERS, with kernel="triton"."""
    from rlrr.layers import RLRRLinear
    launches = []
    torch.manual_seed(0)
    for out, inn, groups, rank, sides, form, storage, compute in LAYERS:
        layer = RLRRLinear(nn.Linear(inn, out).to(storage), in_groups=groups, rank=rank, sides=sides, form=form,
                           kernel="triton")
        x = torch.randn(4, inn, dtype=storage, requires_grad=True)
        autocast = torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32)
        with recorded_launches(launches), autocast:
            layer(x).float().sum().backward()
    return launches


def _variant(kernel, args, constexprs, backend):
    """Triton's signature, constexprs, attributes and options for this launch, as its launcher would make them."""
    from triton.runtime.jit import create_function_from_signature
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **constexprs)
    return kernel._pack_args(backend, constexprs, bound, specialization, options)


def _resources(cubin: bytes, cuobjdump: str) -> dict:
    """Registers, spilled (local) bytes and shared memory of a cubin, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", usage))
    return {"registers": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]) + int(fields["STACK"]),
            "shared_bytes": int(fields["SHARED"])}


def _describe(kernel, signature: dict, constexprs: dict, attrs: dict) -> str:
    """``name(pointer dtypes; constexprs; integers Triton knows are multiples of 16)``: the last decides
    whether loads are vectorised (ViT's widths all are; the odd test shapes are not)."""
    names = kernel.arg_names
    dtypes = ",".join(f"{n.removesuffix('_ptr')}={t[1:]}" for n, t in signature.items() if t.startswith("*"))
    consts = ",".join(f"{names[path[0]]}={value}" for path, value in sorted(constexprs.items())
                      if not names[path[0]].startswith("BLOCK"))
    by16 = ",".join(names[path[0]] for path, attr in sorted(attrs.items())
                    if signature[names[path[0]]] == "i32" and ["tt.divisibility", 16] in attr)
    return f"{kernel.__name__}({dtypes}; {consts}; x16: {by16 or '-'})"


def compile_all(archs: list) -> list:
    """One row per (distinct launch variant, architecture): built or the error, and its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UsageError("TRITON_INTERPRET=1 makes the kernels Python functions, which do not compile; unset it")
    launches = training_launches()
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        seen = set()
        for kernel, args, constexprs in launches:
            if not isinstance(kernel, JITFunction):
                raise UsageError(f"{kernel!r} is not a Triton JIT function")
            try:
                options, signature, consts, attrs = _variant(kernel, args, constexprs, backend)
            except (AttributeError, TypeError, ImportError) as e:
                raise UsageError(f"this Triton ({triton.__version__}) has no launch binder this tool can read: {e}")
            key = (kernel.__name__, repr(signature), repr(consts), repr(attrs))
            if key in seen:
                continue
            seen.add(key)
            row = {"arch": f"sm_{arch}", "kernel": kernel.__name__,
                   "variant": _describe(kernel, signature, consts, attrs)}
            try:
                compiled = triton.compile(ASTSource(kernel, signature, consts, attrs), target=target,
                                          options=options.__dict__)
            except Exception as e:  # a kernel that does not build: reported with its variant, the others go on
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            else:
                row["num_warps"] = compiled.metadata.num_warps
                if os.access(cuobjdump, os.X_OK):
                    row.update(_resources(compiled.asm["cubin"], cuobjdump))
            rows.append(row)
    return rows


@tool_main("compile_kernels")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90",
                        help="compute capabilities, comma-separated: 80 A100, 90 H100/H200, 100 B200 (default 80,90)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a.isdigit()]
    if not archs or len(archs) != len(args.arch.split(",")) or not all(MIN_ARCH <= a <= MAX_ARCH for a in archs):
        # outside that range LLVM aborts the process instead of raising
        raise UsageError(f"--arch {args.arch!r}: expected compute capabilities from {MIN_ARCH} to {MAX_ARCH}, "
                         "comma-separated, such as 80,90")
    rows = compile_all(archs)
    print("| arch | kernel variant | registers | spilled bytes | shared bytes | warps |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['arch']} | {r['variant']} | did not build: {r['error']} | | | |")
        else:
            print(f"| {r['arch']} | {r['variant']} | {r.get('registers', '?')} | {r.get('local_bytes', '?')} | "
                  f"{r.get('shared_bytes', '?')} | {r['num_warps']} |")
    if args.json:
        write_json_atomic(args.json, rows)
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"compile_kernels: {r['variant']} did not build for {r['arch']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
