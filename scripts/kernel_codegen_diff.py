"""Compile the Triton kernels of two revisions for a GPU, on a machine without
one, and compare what the compiler emits.

The interpreter check (scripts/kernel_bitwise.py) shows a refactor changes
no number on the CPU; this one looks at the GPU code: each kernel of
``kernels/triton_flash.py`` at ``--old`` (a git revision) and in the working
tree is compiled to PTX for sm_90 (ptxas ships with Triton) over a grid of
dtypes, head dims and causal/mask variants, and the PTX instruction
multisets are compared (register names, labels, debug info and order
ignored), split into floating-point/convert/tensor-core/memory instructions
and integer bookkeeping. Equal multisets do not prove equal code, but a
change in the arithmetic would show up as a different float multiset.

    PYTHONPATH=. python scripts/kernel_codegen_diff.py --old HEAD~1
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, compiled ahead of time

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_FLOAT_MEM = ("ld", "st", "cp.async", "mma", "wgmma", "ex2", "lg2", "cvt", "div", "rcp", "fma", "ldmatrix",
              "stmatrix")
_FLOAT_TYPES = {"f16", "f32", "bf16", "f64", "f16x2", "bf16x2"}


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _signature(kernel, pointers, consts):
    sig, cx = {}, {}
    for n in kernel.arg_names:
        if n in consts:
            sig[n], cx[n] = "constexpr", consts[n]
        elif n in pointers:
            sig[n] = pointers[n]
        elif n in ("c", "sm_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig, cx


def ptx_ops(ptx: str) -> collections.Counter:
    """Multiset of PTX instruction mnemonics (with type suffixes)."""
    ptx = ptx.split("\t.section\t.debug")[0]
    ops = collections.Counter()
    for line in ptx.splitlines():
        line = line.strip()
        if not line or line.startswith((".", "//", "{", "}", "$")):
            continue
        m = re.match(r"(@!?%\w+\s+)?([a-z][\w.]*)\s", line + " ")
        if m:
            ops[m.group(2)] += 1
    return ops


def float_mem(ops) -> dict:
    return {k: v for k, v in ops.items() if k.startswith(_FLOAT_MEM) or _FLOAT_TYPES & set(k.split("."))}


def _jobs():
    for dt, p in (("fp16", tl.float16), ("bf16", tl.bfloat16), ("fp32", tl.float32)):
        for d, d_pad in ((64, 64), (40, 64), (128, 128)):
            for causal, has_mask, mask_bool in ((False, False, False), (True, False, False), (False, True, True),
                                                (True, True, False)):
                pointers = {n: f"*{dt}" for n in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}
                pointers.update(Lse2="*fp32", Delta="*fp32", Mask="*u8" if mask_bool else f"*{dt}")
                c = dict(D=d, D_PAD=d_pad, BLOCK_M=64, BLOCK_N=32, CAUSAL=causal, HAS_MASK=has_mask,
                         MASK_BOOL=mask_bool, UPCAST=False, IN_PREC="tf32" if dt == "fp32" else "ieee",
                         P_DTYPE=p, RN_BF16=False)
                tag = f"{dt} D={d} causal={causal} mask={'bool' if mask_bool else 'add' if has_mask else 'none'}"
                for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
                    yield f"{name} {tag}", name, pointers, c
                if not (causal or has_mask):
                    yield f"_bwd_preprocess_kernel {tag}", "_bwd_preprocess_kernel", pointers, \
                        dict(D=d, D_PAD=d_pad, BLOCK_M=64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="git revision of the kernels to compare against")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90)")
    args = parser.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        old_path = os.path.join(tmp, "old_triton_flash.py")
        with open(old_path, "w") as fh:
            fh.write(subprocess.run(["git", "-C", root, "show", f"{args.old}:kernels/triton_flash.py"],
                                    check=True, capture_output=True, text=True).stdout)
        old = _load(old_path, "old_triton_flash")
        new = _load(os.path.join(root, "kernels", "triton_flash.py"), "new_triton_flash")
        target = GPUTarget("cuda", args.arch, 32)
        n = same_all = same_float = 0
        for tag, name, pointers, consts in _jobs():
            ops = []
            for mod in (old, new):
                kernel = getattr(mod, name)
                sig, cx = _signature(kernel, pointers, consts)
                k = triton.compile(ASTSource(kernel, sig, cx), target=target,
                                   options={"num_warps": 4, "num_stages": 2, "enable_fp_fusion": False})
                ops.append(ptx_ops(k.asm["ptx"]))
            n += 1
            same_all += ops[0] == ops[1]
            same_float += float_mem(ops[0]) == float_mem(ops[1])
            diff = {x: (ops[0][x], ops[1][x]) for x in set(ops[0]) | set(ops[1]) if ops[0][x] != ops[1][x]}
            print(f"{tag}: {'same' if not diff else diff}", flush=True)
    print(f"{n} kernels compiled for sm_{args.arch}: same float/convert/mma/memory instructions in {same_float}, "
          f"same instruction multiset overall in {same_all}")
    return 0 if same_float == n else 1


if __name__ == "__main__":
    sys.exit(main())
