"""Reproducer: torch SDPA, CUDNN_ATTENTION backend, grad-wrong.

The bug: a gradient's error at the failing element exceeds the certified
    bound.
What went wrong: gradient: dk error 258 exceeds bound 2.98e-08 at (0, 2,
    351, 143) (ratio 8.65e+09, model fa2+gpu); key (0, 2, 351): key seen by
    no query; dk row is nonzero where the exact gradient is zero
Signature: sdpa-cudnn | grad-wrong | dk row is nonzero where the exact
    gradient is zero | key seen by no query
Case: fp16, B=1 H=4 Hkv=4 Nq=33 Nk=1089 D=256, not causal, bool attn_mask
    (33, 1089) (True = attend), default scale, contiguous layout,
    near-max-input magnitudes
What is special: key seen by no query; attn_mask; bool mask; head dim over
    128; Nq not a multiple of 64; Nk not a multiple of 64; magnitude
    near-max-input; dO zero-rows
Found on: device cuda, python 3.12.3, torch 2.11.0+cu130, date 2026-11-22
    21:52:30, gpu NVIDIA H100 80GB HBM3

The backward: q, k, v require grad, and dq, dk, dv =
    torch.autograd.grad(out, (q, k, v), do), with do (the output gradient)
    among the exact inputs.
Needs torch and numpy (inputs.npz holds the inputs). Usage: python repro.py [--device DEV] [--dump PATH]
(--dump saves the inputs' bit patterns and strides to PATH and stops).
Exit status: 1 bug reproduced, 0 not reproduced, 2 the call or its backward
    raised instead.
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
    "fp16, B=1 H=4 Hkv=4 Nq=33 Nk=1089 D=256, not causal, bool attn_mask "
    "(33, 1089) (True = attend), default scale, contiguous layout, "
    "near-max-input magnitudes"
)
AT = (0, 2, 351, 143)  # failing element of dk (b, kv_head, j, d)
GRADIENT = "dk"  # the failing gradient
ALLOWED = 2.980232241545089e-08  # |observed - expected| allowed at AT
ALLOWED_MAX = 0.0033460930016929284  # the largest error allowed in dk
MODEL = 'fa2+gpu'  # the precision model the bound is for


# -- inputs: the exact bits of the failing run --------------------------------


def lay_out(t):
    """The case's layout: contiguous (B, H, N, D), row-major."""
    return t.contiguous()


def from_bits(bits, dtype):
    """The tensor of `dtype` whose raw bit patterns are the integers
    `bits` (a NumPy array), so that every value is exact."""
    int_dtype = {torch.float16: np.int16, torch.bfloat16: np.int16,
                 torch.float32: np.int32, torch.float64: np.int64}[dtype]
    return torch.from_numpy(np.ascontiguousarray(bits).view(int_dtype)).view(dtype)


def make_inputs(device):
    """q, k, v and do, the output gradient (in the case's memory
    layout), and attn_mask on `device`."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inputs.npz")
    data = np.load(path)  # raw bit patterns; bfloat16 as uint16
    q = lay_out(from_bits(data['q'], torch.float16).to(device))
    k = lay_out(from_bits(data['k'], torch.float16).to(device))
    v = lay_out(from_bits(data['v'], torch.float16).to(device))
    do = lay_out(from_bits(data['do'], torch.float16).to(device))
    attn_mask = torch.from_numpy(data["attn_mask"]).to(device)  # True = attend
    return q, k, v, attn_mask, do


# -- the call under test ------------------------------------------------------


def run_kernel(q, k, v, attn_mask):
    """The failing call: SDPA with the CUDNN_ATTENTION backend forced."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
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


def reference_gradients(q, k, v, attn_mask, do, is_causal, scale, enable_gqa):
    """(dq, dk, dv) of reference_attention for the output gradient `do`,
    by float64 autograd on the CPU from the exact inputs. dk and dv are
    summed over the query heads that share a kv head."""
    q, k, v = (t.detach().to("cpu", torch.float64).requires_grad_()
               for t in (q, k, v))
    out = reference_attention(q, k, v, attn_mask, is_causal, scale,
                              enable_gqa)
    return torch.autograd.grad(out, (q, k, v), do.to("cpu", torch.float64))


# -- does the bug show? -------------------------------------------------------


def run_backward(q, k, v, attn_mask, do):
    """The failing call with q, k, v requiring grad, then its backward:
    torch.autograd.grad(out, (q, k, v), do). Returns ((dq, dk, dv), None),
    or (None, what raised: "the call" or "the backward")."""
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    what = "the call"
    try:
        out = run_kernel(q, k, v, attn_mask)
        if out.is_cuda:
            torch.cuda.synchronize()  # CUDA errors surface asynchronously
        what = "the backward"
        grads = torch.autograd.grad(out, (q, k, v), do)
        if out.is_cuda:
            torch.cuda.synchronize()
    except Exception as exc:
        print(f"{what} raised {type(exc).__name__}: {exc}")
        return None, what
    return grads, None


def far_from_overflow(expected, dtype):
    """Elements whose expected value is finite and at most half the largest
    value of `dtype`. flashcheck does not judge elements whose certified
    bound allows overflow; this stands in for its rule."""
    return expected.abs() <= torch.finfo(dtype).max / 2


def largest_error(name, observed, expected, judged):
    """The largest |observed - expected| of gradient `name` over the
    elements in `judged` (NaN counts inf), printed and returned."""
    error = (observed - expected).abs().nan_to_num(nan=math.inf)
    error = torch.where(judged, error, 0.0)
    if not error.numel():
        return 0.0
    worst = float(error.max())
    at = tuple(int(i) for i in (error == worst).nonzero()[0])
    print(f"max |observed - expected| over {name}: {worst!r} at {at}")
    return worst


def show_gradient_row(observed, expected, at, width=2):
    """Observed and expected GRADIENT at `at` and its neighbours."""
    b, h, i, d = at
    lo, hi = max(0, d - width), min(observed.shape[-1], d + width + 1)
    print(f"{GRADIENT} of key (b={b}, kv_head={h}, j={i}),",
          f"dims {lo}..{hi - 1}:")
    print(f"{'d':>6} {'observed':>24} {'expected (float64)':>24}")
    for j in range(lo, hi):
        mark = "  <-" if j == d else ""
        got, want = float(observed[b, h, i, j]), float(expected[b, h, i, j])
        print(f"{j:>6} {got!r:>24} {want!r:>24}{mark}")


def check(q, k, v, attn_mask, do):
    """Run the call and its backward; the bug shows if a gradient's
    error at the failing element exceeds the certified bound."""
    grads, raised = run_backward(q, k, v, attn_mask, do)
    if raised:
        print("not reproduced (gradients were expected)")
        return 2
    index = ("dq", "dk", "dv").index(GRADIENT)
    dtype = grads[index].dtype
    observed = grads[index].detach().to("cpu", torch.float64)
    expected = reference_gradients(
        q, k, v, attn_mask, do,
        is_causal=False, scale=None, enable_gqa=False)[index]
    if observed.shape != expected.shape:
        print(f"{GRADIENT} shape {tuple(observed.shape)}, expected "
              f"{tuple(expected.shape)}")
        return 2
    show_gradient_row(observed, expected, AT)
    judged = far_from_overflow(expected, dtype)
    worst = largest_error(GRADIENT, observed, expected, judged)
    error = abs(float(observed[AT]) - float(expected[AT]))
    print(f"at {AT}: |observed - expected| = {error!r}, allowed {ALLOWED!r}")
    print("(allowed: flashcheck's certified error bound at this element for "
          f"the precision model {MODEL!r})")
    print(f"largest error anywhere in {GRADIENT} {worst!r}; the largest "
          f"bound anywhere is {ALLOWED_MAX!r}")
    # A NaN error counts as the bug. Some kernels go wrong at different
    # elements from run to run, so an error above every element's bound
    # counts too (away from overflow, where no bound holds).
    bug = not error <= ALLOWED or worst > ALLOWED_MAX
    print("bug reproduced" if bug else "not reproduced")
    return 1 if bug else 0


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
    q, k, v, attn_mask, do = make_inputs(args.device)
    if args.dump:
        dump(args.dump, q=q, k=k, v=v, attn_mask=attn_mask, do=do)
        return 0
    return check(q, k, v, attn_mask, do)


if __name__ == "__main__":
    sys.exit(main())
