"""Reproducer: torch SDPA, FLASH_ATTENTION backend, fault.

The bug: the call raises a (CUDA) fault.
What went wrong: device fault (misaligned address): AcceleratorError: CUDA
    error: misaligned address, in a fresh process (its first case, so this
    case caused it)
Signature: sdpa-flash | fault | misaligned address
Case: fp16, B=1 H=1 Hkv=1 Nq=1 Nk=16384 D=32, not causal, no attn_mask,
    default scale, strided layout, nan-inf magnitudes
What is special: non-contiguous layout; strided layout; Nq not a multiple
    of 64; single query; magnitude nan-inf
Found on: device cuda, python 3.12.3, torch 2.11.0+cu130, date 2026-11-22
    23:58:26, gpu NVIDIA H100 80GB HBM3

Needs torch and numpy (inputs.npz holds the inputs). Usage: python repro.py [--device DEV] [--dump PATH]
(--dump saves the inputs' bit patterns and strides to PATH and stops).
Exit status: 1 bug reproduced, 0 not reproduced, 2 the backend declines it.
"""

import argparse
import math
import os
import platform
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEVICE = "cuda"  # where it was found; --device overrides it
CASE = (
    "fp16, B=1 H=1 Hkv=1 Nq=1 Nk=16384 D=32, not causal, no attn_mask, "
    "default scale, strided layout, nan-inf magnitudes"
)
AT = None  # no single failing element


# -- inputs: the exact bits of the failing run --------------------------------


def lay_out(t):
    """The case's layout: a view into a larger NaN-filled buffer, so that the
    batch, head and row strides are padded (the last dim keeps stride 1).
    A kernel that ignores the strides reads the NaN padding."""
    B, H, N, D = t.shape
    big = torch.empty((B + 1, H + 1, N, D + 3), dtype=t.dtype, device=t.device)
    big.fill_(float("nan"))
    view = big[1:, 1:, :, 3:]
    view.copy_(t)
    return view


def from_bits(bits, dtype):
    """The tensor of `dtype` whose raw bit patterns are the integers
    `bits` (a NumPy array), so that every value is exact."""
    int_dtype = {torch.float16: np.int16, torch.bfloat16: np.int16,
                 torch.float32: np.int32, torch.float64: np.int64}[dtype]
    return torch.from_numpy(np.ascontiguousarray(bits).view(int_dtype)).view(dtype)


def make_inputs(device):
    """q, k, v (in the case's memory layout) and attn_mask on `device`."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inputs.npz")
    data = np.load(path)  # raw bit patterns; bfloat16 as uint16
    q = lay_out(from_bits(data['q'], torch.float16).to(device))
    k = lay_out(from_bits(data['k'], torch.float16).to(device))
    v = lay_out(from_bits(data['v'], torch.float16).to(device))
    attn_mask = None
    return q, k, v, attn_mask


# -- the call under test ------------------------------------------------------


def run_kernel(q, k, v, attn_mask):
    """The failing call: SDPA with the FLASH_ATTENTION backend forced."""
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=0.0,
            is_causal=False, scale=None, enable_gqa=False)


# -- expected values: float64 attention on the same inputs --------------------


def repeat_kv(t, num_heads):
    """GQA/MQA: kv head j serves query heads j * g .. (j + 1) * g - 1, where
    g = num_heads // Hkv (heads are dim 1)."""
    return t.repeat_interleave(num_heads // t.shape[1], dim=1)


def visible_keys(q, k, attn_mask, is_causal):
    """(B, H, Nq, Nk) bool, on the CPU: may query i attend to key j?"""
    B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    visible = torch.ones(Nq, Nk, dtype=torch.bool)
    if is_causal:
        visible = visible.tril()  # top-left aligned: j <= i
    visible = visible.expand(B, H, Nq, Nk)
    if attn_mask is not None:
        mask = attn_mask.cpu()
        if mask.dtype == torch.bool:
            visible = visible & mask  # True = attend
        else:
            visible = visible & (mask != float("-inf"))  # additive
    return visible.expand(B, H, Nq, Nk)


def reference_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    """softmax(q k^T * scale + mask) v in float64 on the CPU, from the exact
    inputs, with scaled_dot_product_attention's semantics. (enable_gqa only
    permits Hkv < H; the mapping is repeat_kv's.) Differentiable in q, k, v
    when they are float64 CPU tensors that require grad."""
    visible = visible_keys(q, k, attn_mask, is_causal)
    q, k, v = (t.to("cpu", torch.float64) for t in (q, k, v))
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.cpu().to(torch.float64)
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row with no visible key would be 0/0 = NaN; SDPA's math and efficient
    # backends return 0 for it, and so does this reference. Its scores are
    # set to 0 first, so that no NaN reaches the backward either: its
    # gradients come out exactly 0.
    empty = ~visible.any(-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    out = torch.softmax(scores, dim=-1) @ v
    return out.masked_fill(empty, 0.0)


# -- does the bug show? -------------------------------------------------------


def show_row(observed, expected, at, width=2):
    """Observed and expected values at `at` and its neighbours in the row."""
    b, h, i = at[:3]
    d = at[3] if len(at) == 4 else width  # a row: its first dims
    lo, hi = max(0, d - width), min(observed.shape[-1], d + width + 1)
    print(f"output row (b={b}, h={h}, i={i}), dims {lo}..{hi - 1}:")
    print(f"{'d':>6} {'observed':>24} {'expected (float64)':>24}")
    for j in range(lo, hi):
        mark = "  <-" if len(at) == 4 and j == d else ""
        got, want = float(observed[b, h, i, j]), float(expected[b, h, i, j])
        print(f"{j:>6} {got!r:>24} {want!r:>24}{mark}")


def show_max_error(observed, expected):
    """The largest |observed - expected| over the output (NaN counts inf)."""
    error = (observed - expected).abs().nan_to_num(nan=math.inf)
    if error.numel():
        worst = tuple(int(i) for i in (error == error.max()).nonzero()[0])
        print(f"max |observed - expected| over the output: "
              f"{float(error.max())!r} at {worst}")


def check(q, k, v, attn_mask):
    """The failure was the call raising (a fault, e.g. an illegal address).
    Does it raise again?"""
    try:
        out = run_kernel(q, k, v, attn_mask)
        if out.is_cuda:
            torch.cuda.synchronize()  # CUDA errors surface asynchronously
    except Exception as exc:
        print(f"the call raised {type(exc).__name__}: {exc}")
        declined = ("No available kernel", "No viable backend")
        if any(text in str(exc) for text in declined):
            print("not reproduced: the backend declines this case here")
            return 2
        print("bug reproduced")
        return 1
    print("the call returned normally")
    show_max_error(out.detach().to("cpu", torch.float64), reference_attention(
        q, k, v, attn_mask, is_causal=False, scale=None, enable_gqa=False))
    print("not reproduced")
    return 0


def print_versions(device):
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    if torch.device(device).type == "cuda":
        print(f"device {device}: {torch.cuda.get_device_name(device)}")
    else:
        print(f"device {device}: {platform.processor() or platform.machine()}")


def dump(path, **tensors):
    """Save each tensor's raw bit patterns and strides to `path` (.npz)."""
    import numpy as np

    arrays = {}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype.is_floating_point:
            int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}
            t = t.view(int_dtype[t.element_size()])
        arrays[name] = t.cpu().contiguous().numpy()
        arrays[name + "_strides"] = np.array(t.stride())
    np.savez(path, **arrays)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=DEVICE)
    parser.add_argument("--dump", metavar="PATH",
                        help="save the inputs (bits, strides) to PATH; stop")
    args = parser.parse_args()
    print_versions(args.device)
    print("case:", CASE)
    q, k, v, attn_mask = make_inputs(args.device)
    if args.dump:
        dump(args.dump, q=q, k=k, v=v, attn_mask=attn_mask)
        return 0
    return check(q, k, v, attn_mask)


if __name__ == "__main__":
    sys.exit(main())
