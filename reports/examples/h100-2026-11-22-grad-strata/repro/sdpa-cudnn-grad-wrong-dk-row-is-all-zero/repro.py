"""Reproducer: torch SDPA, CUDNN_ATTENTION backend, grad-wrong.

The bug: a gradient's error at the failing element exceeds the certified
    bound.
What went wrong: gradient: dk error 2e-38 exceeds bound 3.23e-40 at (0, 0,
    21, 31) (ratio 62.1, model fa2+gpu); key (0, 0, 21): key seen by one
    query, key in last partial key tile, key seen by the last partial query
    tile; dk row is all zero
Signature: sdpa-cudnn | grad-wrong | dk row is all zero
Case: bf16, B=1 H=1 Hkv=1 Nq=1 Nk=22 D=32 Dv=16, not causal, bool attn_mask
    (1, 22) (True = attend), scale=1.0, contiguous layout, uniform
    magnitudes
What is special: key seen by one query; key in last partial key tile; key
    seen by the last partial query tile; attn_mask; bool mask; Dv != D; Nq
    not a multiple of 64; Nk not a multiple of 64; single query; explicit
    scale; magnitude uniform; dO tiny
Found on: device cuda, python 3.12.3, torch 2.11.0+cu130, date 2026-11-22
    21:52:30, gpu NVIDIA H100 80GB HBM3

The backward: q, k, v require grad, and dq, dk, dv =
    torch.autograd.grad(out, (q, k, v), do), with do (the output gradient)
    among the exact inputs.
Needs torch. Usage: python repro.py [--device DEV] [--dump PATH]
(--dump saves the inputs' bit patterns and strides to PATH and stops).
Exit status: 1 bug reproduced, 0 not reproduced, 2 the call or its backward
    raised instead.
"""

import argparse
import math
import platform
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEVICE = "cuda"  # where it was found; --device overrides it
CASE = (
    "bf16, B=1 H=1 Hkv=1 Nq=1 Nk=22 D=32 Dv=16, not causal, bool attn_mask "
    "(1, 22) (True = attend), scale=1.0, contiguous layout, uniform "
    "magnitudes"
)
AT = (0, 0, 21, 31)  # failing element of dk (b, kv_head, j, d)
GRADIENT = "dk"  # the failing gradient
ALLOWED = 3.227603090154023e-40  # |observed - expected| allowed at AT
ALLOWED_MAX = 8.639970406574257e-40  # the largest error allowed in dk
MODEL = 'fa2+gpu'  # the precision model the bound is for


# -- inputs: the exact bits of the failing run --------------------------------


def lay_out(t):
    """The case's layout: contiguous (B, H, N, D), row-major."""
    return t.contiguous()


def from_bits(bits, dtype, shape):
    """The tensor of `dtype` whose raw bit patterns are the integers
    `bits` (so every value, NaN payloads and subnormals included, is
    exact)."""
    int_dtype = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
                 torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    return torch.tensor(bits, dtype=int_dtype).view(dtype).reshape(shape)


def make_inputs(device):
    """q, k, v and do, the output gradient (in the case's memory
    layout), and attn_mask on `device`."""
    q = lay_out(from_bits(Q_BITS, torch.bfloat16, (1, 1, 1, 32)).to(device))
    k = lay_out(from_bits(K_BITS, torch.bfloat16, (1, 1, 22, 32)).to(device))
    v = lay_out(from_bits(V_BITS, torch.bfloat16, (1, 1, 22, 16)).to(device))
    do = lay_out(from_bits(DO_BITS, torch.bfloat16, (1, 1, 1, 16)).to(device))
    attn_mask = torch.tensor(MASK_BITS, dtype=torch.bool).reshape((1, 22))
    attn_mask = attn_mask.to(device)  # True = attend
    return q, k, v, attn_mask, do


# -- the call under test ------------------------------------------------------


def run_kernel(q, k, v, attn_mask):
    """The failing call: SDPA with the CUDNN_ATTENTION backend forced."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=0.0,
            is_causal=False, scale=1.0, enable_gqa=False)


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
        is_causal=False, scale=1.0, enable_gqa=False)[index]
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


# -- data ---------------------------------------------------------------------


# Raw bit patterns (bfloat16 as int16), flattened in (B, H, N, D) order.
Q_BITS = [
    -16429, 16006, -16822, 16243, -16638, 15942, 16006, 16063, 15739, 16170,
    16333, -16971, -16460, 15427, 16179, -16991, 16271, 15922, -16642, -16504,
    16270, -16662, 16229, 16345, 15645, 15944, -16625, 16161, -16606, 16229,
    -16583, 16384
]
K_BITS = [
    -16813, -16740, -16816, -16454, 16250, 16358, -16564, 16144, 15690, 15644,
    15987, 16391, 16423, 16272, -16652, 15820, -16459, -16716, -16536, -16477,
    -16954, -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735, 16083,
    -16506, -16379, -16813, -16740, -16816, -16454, 16250, 16358, -16564,
    16144, 15690, 15644, 15987, 16391, 16423, 16272, -16652, 15820, -16459,
    -16716, -16536, -16477, -16954, -17205, 15766, 16081, 16139, -16538, 16283,
    -16507, -16735, 16083, -16506, -16379, -16813, -16740, -16816, -16454,
    16250, 16358, -16564, 16144, 15690, 15644, 15987, 16391, 16423, 16272,
    -16652, 15820, -16459, -16716, -16536, -16477, -16954, -17205, 15766,
    16081, 16139, -16538, 16283, -16507, -16735, 16083, -16506, -16379, -16813,
    -16740, -16816, -16454, 16250, 16358, -16564, 16144, 15690, 15644, 15987,
    16391, 16423, 16272, -16652, 15820, -16459, -16716, -16536, -16477, -16954,
    -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735, 16083, -16506,
    -16379, -16813, -16740, -16816, -16454, 16250, 16358, -16564, 16144, 15690,
    15644, 15987, 16391, 16423, 16272, -16652, 15820, -16459, -16716, -16536,
    -16477, -16954, -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735,
    16083, -16506, -16379, -16813, -16740, -16816, -16454, 16250, 16358,
    -16564, 16144, 15690, 15644, 15987, 16391, 16423, 16272, -16652, 15820,
    -16459, -16716, -16536, -16477, -16954, -17205, 15766, 16081, 16139,
    -16538, 16283, -16507, -16735, 16083, -16506, -16379, -16813, -16740,
    -16816, -16454, 16250, 16358, -16564, 16144, 15690, 15644, 15987, 16391,
    16423, 16272, -16652, 15820, -16459, -16716, -16536, -16477, -16954,
    -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735, 16083, -16506,
    -16379, -16813, -16740, -16816, -16454, 16250, 16358, -16564, 16144, 15690,
    15644, 15987, 16391, 16423, 16272, -16652, 15820, -16459, -16716, -16536,
    -16477, -16954, -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735,
    16083, -16506, -16379, -16813, -16740, -16816, -16454, 16250, 16358,
    -16564, 16144, 15690, 15644, 15987, 16391, 16423, 16272, -16652, 15820,
    -16459, -16716, -16536, -16477, -16954, -17205, 15766, 16081, 16139,
    -16538, 16283, -16507, -16735, 16083, -16506, -16379, -16813, -16740,
    -16816, -16454, 16250, 16358, -16564, 16144, 15690, 15644, 15987, 16391,
    16423, 16272, -16652, 15820, -16459, -16716, -16536, -16477, -16954,
    -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735, 16083, -16506,
    -16379, -16813, -16740, -16816, -16454, 16250, 16358, -16564, 16144, 15690,
    15644, 15987, 16391, 16423, 16272, -16652, 15820, -16459, -16716, -16536,
    -16477, -16954, -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735,
    16083, -16506, -16379, -16813, -16740, -16816, -16454, 16250, 16358,
    -16564, 16144, 15690, 15644, 15987, 16391, 16423, 16272, -16652, 15820,
    -16459, -16716, -16536, -16477, -16954, -17205, 15766, 16081, 16139,
    -16538, 16283, -16507, -16735, 16083, -16506, -16379, -16813, -16740,
    -16816, -16454, 16250, 16358, -16564, 16144, 15690, 15644, 15987, 16391,
    16423, 16272, -16652, 15820, -16459, -16716, -16536, -16477, -16954,
    -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735, 16083, -16506,
    -16379, -16813, -16740, -16816, -16454, 16250, 16358, -16564, 16144, 15690,
    15644, 15987, 16391, 16423, 16272, -16652, 15820, -16459, -16716, -16536,
    -16477, -16954, -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735,
    16083, -16506, -16379, -16813, -16740, -16816, -16454, 16250, 16358,
    -16564, 16144, 15690, 15644, 15987, 16391, 16423, 16272, -16652, 15820,
    -16459, -16716, -16536, -16477, -16954, -17205, 15766, 16081, 16139,
    -16538, 16283, -16507, -16735, 16083, -16506, -16379, -16813, -16740,
    -16816, -16454, 16250, 16358, -16564, 16144, 15690, 15644, 15987, 16391,
    16423, 16272, -16652, 15820, -16459, -16716, -16536, -16477, -16954,
    -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735, 16083, -16506,
    -16379, -16813, -16740, -16816, -16454, 16250, 16358, -16564, 16144, 15690,
    15644, 15987, 16391, 16423, 16272, -16652, 15820, -16459, -16716, -16536,
    -16477, -16954, -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735,
    16083, -16506, -16379, -16813, -16740, -16816, -16454, 16250, 16358,
    -16564, 16144, 15690, 15644, 15987, 16391, 16423, 16272, -16652, 15820,
    -16459, -16716, -16536, -16477, -16954, -17205, 15766, 16081, 16139,
    -16538, 16283, -16507, -16735, 16083, -16506, -16379, -16813, -16740,
    -16816, -16454, 16250, 16358, -16564, 16144, 15690, 15644, 15987, 16391,
    16423, 16272, -16652, 15820, -16459, -16716, -16536, -16477, -16954,
    -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735, 16083, -16506,
    -16379, -16813, -16740, -16816, -16454, 16250, 16358, -16564, 16144, 15690,
    15644, 15987, 16391, 16423, 16272, -16652, 15820, -16459, -16716, -16536,
    -16477, -16954, -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735,
    16083, -16506, -16379, -16813, -16740, -16816, -16454, 16250, 16358,
    -16564, 16144, 15690, 15644, 15987, 16391, 16423, 16272, -16652, 15820,
    -16459, -16716, -16536, -16477, -16954, -17205, 15766, 16081, 16139,
    -16538, 16283, -16507, -16735, 16083, -16506, -16379, -16813, -16740,
    -16816, -16454, 16250, 16358, -16564, 16144, 15690, 15644, 15987, 16391,
    16423, 16272, -16652, 15820, -16459, -16716, -16536, -16477, -16954,
    -17205, 15766, 16081, 16139, -16538, 16283, -16507, -16735, 16083, -16506,
    -16379
]
V_BITS = [
    16322, -16583, 16121, -16758, 16080, -16617, 15779, -16621, 16294, 16228,
    -16514, 16108, 16076, 16299, 16351, 16047, -16596, -16410, 16225, 16395,
    -16763, 16129, 16281, -16509, -17467, 15655, -16385, -16998, -16807, 16335,
    -16745, -16427, -16623, -16626, -16855, 16230, 16300, 16204, 16067, -16401,
    16263, 15948, -16795, -16833, -16391, -16913, -16365, 16179, 16410, -16342,
    -16527, -16859, 16236, -16516, 16152, 16016, 16249, -16703, -16586, -16773,
    16194, -16497, 16150, 16244, -16701, 16061, -16562, 16272, -16623, 16222,
    16278, -16505, 16121, 16092, -16889, -16762, 16016, -16367, 16280, 16066,
    15796, 16122, -16581, -16451, 16200, 16310, -16648, 15671, -16435, 15608,
    -16671, 16294, 16172, -16575, 16079, -16590, -16622, -16478, -16611,
    -16621, -16491, -16748, -16633, 16060, -16679, -16606, -16506, 15775,
    -16613, 16196, -16943, -16611, 16309, -16572, 16370, -16702, 16226, 16274,
    -16543, 16108, 16140, -16517, 16155, -16415, 16194, 15589, 16020, -16495,
    16070, -17132, -16585, -16685, -16606, -17498, 16164, 16033, 15921, 16093,
    -16603, 16366, 16142, -16498, -16669, -16746, 15625, 16022, -16814, 16285,
    15969, 16018, -16505, -16496, 15926, 16308, -16543, 16262, 16266, -16439,
    16316, -16484, 16196, -16623, 16042, -16577, 16224, 16256, -16466, 16083,
    -16749, 16344, -16652, -17209, -16955, -16475, 16193, 16314, -16993, 15942,
    16388, -16476, -16716, -16566, 16004, -16608, -16498, -16529, 15880,
    -16568, 16389, 16054, -16412, 16210, 16335, -16757, 16192, -16581, 16023,
    16323, -16688, 15798, 15680, 15949, 15886, -16851, -16447, 16183, -16671,
    16298, 16143, 16136, -16659, 15927, -16561, 16368, -16709, 16064, -16485,
    16202, 16111, -16580, 16144, -16446, 16386, -16417, 16270, -16497, 15781,
    -17101, -16686, -16592, 16211, -16612, -16505, -16743, 15732, 16304,
    -16495, -16493, -16482, 15788, -16511, 16065, 16385, 15552, 16052, -16620,
    -16863, 16257, -16524, -16874, -16431, 16045, 16223, 16258, 16299, 16349,
    16184, 16325, -16760, -16825, 16398, 16032, 16286, -16757, -16446, -16496,
    -16701, -16747, 16277, 16188, 16130, -16456, -16521, 16129, 16161, -16690,
    15933, -16625, -16642, 15988, 16185, 16056, -16873, -16733, 16088, 16124,
    -16564, -16360, 16365, 16228, 16289, 16139, -16972, 16083, -16444, -16382,
    -16538, -16689, 16088, -16516, -16598, 15478, 16139, 15772, 16196, -16573,
    16321, 16092, 16173, 16302, -16577, -16632, 16241, -17393, 15842, 16048,
    16304, 16424, -16349, 16063, 16268, 16228, -16669, -16711, 16394, 15926,
    16303, 16285, 16189, -16868, 16194, -16333, 16198, -16670, -16369, 16031,
    -16734, 15853, -16631, -16746, -16433, 16014, -16507, 15631, 16033, 16330,
    16156, 16029, 15687, 16026, -16415, 16178
]
DO_BITS = [
    173, 297, 479, -32605, 431, -32268, -32533, 150, -32181, 2, 174, -32406,
    121, 580, -32620, 118
]
# attn_mask (1, 22), 0/1.
MASK_BITS = [1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1]


if __name__ == "__main__":
    sys.exit(main())
