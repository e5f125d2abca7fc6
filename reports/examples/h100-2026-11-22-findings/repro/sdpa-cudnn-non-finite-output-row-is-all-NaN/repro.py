"""Reproducer: torch SDPA, CUDNN_ATTENTION backend, non-finite.

The bug: NaN/Inf in the output where the float64 reference is finite.
What went wrong: non-finite output nan at (0, 0, 0, 0) from finite inputs;
    row (0, 0, 0): row in last partial query tile, row sees the last
    partial key tile; output row is all NaN
Signature: sdpa-cudnn | non-finite | output row is all NaN
Case: bf16, B=1 H=1 Hkv=1 Nq=2 Nk=4 D=32, not causal, no attn_mask, default
    scale, strided layout, fa3-outliers magnitudes
What is special: row in last partial query tile; row sees the last partial
    key tile; non-contiguous layout; strided layout; Nq not a multiple of
    64; Nk not a multiple of 64; magnitude fa3-outliers
Found on: device cuda, python 3.12.3, torch 2.11.0+cu130, date 2026-11-22
    19:33:49, gpu NVIDIA H100 80GB HBM3

Needs torch. Usage: python repro.py [--device DEV] [--dump PATH]
(--dump saves the inputs' bit patterns and strides to PATH and stops).
Exit status: 1 bug reproduced, 0 not reproduced, 2 the call raised instead.
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
    "bf16, B=1 H=1 Hkv=1 Nq=2 Nk=4 D=32, not causal, no attn_mask, default "
    "scale, strided layout, fa3-outliers magnitudes"
)
AT = (0, 0, 0, 0)  # failing output element (b, h, i, d)


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


def from_bits(bits, dtype, shape):
    """The tensor of `dtype` whose raw bit patterns are the integers
    `bits` (so every value, NaN payloads and subnormals included, is
    exact)."""
    int_dtype = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
                 torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    return torch.tensor(bits, dtype=int_dtype).view(dtype).reshape(shape)


def make_inputs(device):
    """q, k, v (in the case's memory layout) and attn_mask on `device`."""
    q = lay_out(from_bits(Q_BITS, torch.bfloat16, (1, 1, 2, 32)).to(device))
    k = lay_out(from_bits(K_BITS, torch.bfloat16, (1, 1, 4, 32)).to(device))
    v = lay_out(from_bits(V_BITS, torch.bfloat16, (1, 1, 4, 32)).to(device))
    attn_mask = None
    return q, k, v, attn_mask


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
    permits Hkv < H; the mapping is repeat_kv's.)"""
    visible = visible_keys(q, k, attn_mask, is_causal)
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.cpu().to(torch.float64)
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    # A row with no visible key is 0/0 = NaN here; SDPA's math and efficient
    # backends return 0 for it, and so does this reference.
    return out.masked_fill(~visible.any(-1, keepdim=True), 0.0)


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
    """Run the call; the bug shows if NaN/Inf in the output where the
    float64 reference is finite."""
    try:
        out = run_kernel(q, k, v, attn_mask)
        if out.is_cuda:
            torch.cuda.synchronize()
    except Exception as exc:
        print(f"the call raised {type(exc).__name__}: {exc}")
        print("not reproduced (an output was expected)")
        return 2
    observed = out.detach().to("cpu", torch.float64)
    expected = reference_attention(
        q, k, v, attn_mask, is_causal=False, scale=None, enable_gqa=False)
    if observed.shape != expected.shape:
        print(f"output shape {tuple(observed.shape)}, expected "
              f"{tuple(expected.shape)}")
        return 2
    if AT is not None:
        show_row(observed, expected, AT)
    show_max_error(observed, expected)
    bad = ~torch.isfinite(observed) & torch.isfinite(expected)
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in bad.nonzero()[0])
        print(f"{count} of {bad.numel()} output elements are NaN/Inf where "
              f"the float64 reference is finite; first at {first}")
    bug = count > 0
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
    q, k, v, attn_mask = make_inputs(args.device)
    if args.dump:
        dump(args.dump, q=q, k=k, v=v, attn_mask=attn_mask)
        return 0
    return check(q, k, v, attn_mask)


# -- data ---------------------------------------------------------------------


# Raw bit patterns (bfloat16 as int16), flattened in (B, H, N, D) order.
Q_BITS = [
    16143, 16156, 16031, -16475, 16135, 15504, -16613, -16873, 16177, 16098,
    16347, 15532, -16551, -17012, -16725, 15906, 16265, -16529, 16257, -16744,
    16239, 15758, 16300, -16451, 16086, 16316, 16251, 16246, -16634, 15907,
    16295, -16880, 16262, 16201, -16687, -16638, 15777, -16502, 15942, 15535,
    16159, -16446, 16355, 16001, -16536, -16639, 16031, -16626, -16485, -16630,
    16406, -16528, 16232, -16829, 16165, -16477, 16281, -16497, 16345, 16393,
    16098, -16848, -17097, 15937
]
K_BITS = [
    16048, -16483, 15744, 16103, 16273, -16511, -16402, -16474, 16209, -16497,
    -16484, -16539, -16558, 16138, 16314, -16522, -17099, -16917, -16875,
    -16654, 15683, -16592, 16075, -16341, -16484, 16086, 16332, 15673, 16285,
    16256, 15878, 16151, -16909, -16627, -16562, -17123, 15805, 16259, -16444,
    -16639, -16836, 16392, -16715, 16336, 16031, -16688, -16699, -16758, 15723,
    -16463, 15903, 15992, -16742, 16086, 15628, 15965, -16973, -16674, -16511,
    -16476, 16295, 16136, -16499, -16356, 16173, -16562, -16656, -16535,
    -16499, 16198, 15495, 15402, -16567, 15827, 16203, 15778, -16720, -17060,
    15924, 16204, 16274, 16296, -16667, -16610, -16576, 15510, -16879, 16284,
    -16977, 16339, -17001, -16398, 16180, 16139, 16253, 16151, -16713, -16811,
    15878, -16424, -16613, 16347, -16432, 16274, -16475, -17268, -16620,
    -16453, 16302, -16507, 16367, 16212, -16562, -16551, -16496, 16305, 16206,
    -16760, 16002, -16627, -16536, -16665, 16231, 16411, -16481, -16778,
    -16420, 16218
]
V_BITS = [
    -16618, -16484, -16427, -17563, -16510, -16799, -16611, -16560, -17073,
    -16698, 16302, 16145, 16401, 16329, 16246, 16059, 16134, 16384, -16473,
    -16454, 15983, 16196, -16506, -16503, 16006, 16141, -16453, -16428, -16554,
    15916, 16005, -16703, 16155, 15746, 15751, 16344, 16046, -16464, 16085,
    16156, -16577, 16274, -16406, -16467, -16452, 16404, -16582, -16573,
    -16514, -16570, 16299, -16529, 16203, -16372, -16758, -16965, -16867,
    -16844, 16178, 16205, 16442, -16491, 15887, 16192, 16003, -16608, -16515,
    -16431, -16905, 16117, 16264, 15891, 15781, 16290, 16234, -16448, 16089,
    16266, 15487, -16677, -16508, -16464, 16040, -16596, 16288, 16019, 15765,
    16164, 16017, -16658, 16181, 16053, 15638, -16404, -16496, -16846, -16811,
    -16941, 16329, 16201, 16160, 16315, -16458, -16633, -17418, -16536, -16743,
    -16741, 16055, -16538, 16169, 16169, 16059, -16440, -16599, 16052, -16739,
    16404, -16493, -16562, 16149, -17077, -16931, 15930, 16281, -16537, -16838,
    -16567
]


if __name__ == "__main__":
    sys.exit(main())
