"""Reproducer: torch SDPA, FLASH_ATTENTION backend, fault.

The bug: the call raises a (CUDA) fault.
What went wrong: device fault (misaligned address): AcceleratorError: CUDA
    error: misaligned address, in a warm process after 1 earlier case
    (reproduced in a fresh process)
Signature: sdpa-flash | fault | misaligned address
Case: bf16, B=1 H=1 Hkv=1 Nq=16 Nk=16 D=8, not causal, no attn_mask,
    default scale, strided layout, fa3-outliers magnitudes
What is special: non-contiguous layout; strided layout; head dim not a
    multiple of 16; Nq not a multiple of 64; Nk not a multiple of 64;
    magnitude fa3-outliers; dO huge
Found on: device cuda, python 3.12.3, torch 2.11.0+cu130, date 2026-11-22
    21:43:53, gpu NVIDIA H100 80GB HBM3

Needs torch. Usage: python repro.py [--device DEV] [--dump PATH]
(--dump saves the inputs' bit patterns and strides to PATH and stops).
Exit status: 1 bug reproduced, 0 not reproduced, 2 the backend declines it.
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
    "bf16, B=1 H=1 Hkv=1 Nq=16 Nk=16 D=8, not causal, no attn_mask, default "
    "scale, strided layout, fa3-outliers magnitudes"
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


def from_bits(bits, dtype, shape):
    """The tensor of `dtype` whose raw bit patterns are the integers
    `bits` (so every value, NaN payloads and subnormals included, is
    exact)."""
    int_dtype = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
                 torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    return torch.tensor(bits, dtype=int_dtype).view(dtype).reshape(shape)


def make_inputs(device):
    """q, k, v (in the case's memory layout) and attn_mask on `device`."""
    q = lay_out(from_bits(Q_BITS, torch.bfloat16, (1, 1, 16, 8)).to(device))
    k = lay_out(from_bits(K_BITS, torch.bfloat16, (1, 1, 16, 8)).to(device))
    v = lay_out(from_bits(V_BITS, torch.bfloat16, (1, 1, 16, 8)).to(device))
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


# -- data ---------------------------------------------------------------------


# Raw bit patterns (bfloat16 as int16), flattened in (B, H, N, D) order.
Q_BITS = [
    -16920, 16268, -16552, 16344, -16477, -16470, -16625, -16647, 16099, 16269,
    16151, 16249, -16376, -16687, 16261, 16071, 16284, 16135, -16625, -16891,
    -16657, 16396, 16288, 16183, -16885, 16192, -16353, -16696, 16146, -16504,
    15806, 16205, 16356, -16697, -16551, -16365, 16296, 16175, 16153, -16480,
    16050, -16791, 16143, -16470, 16070, -16504, -16839, 16180, -16696, -16364,
    -16994, -16497, -16621, -16490, -16622, 16274, 16116, -16480, 16189, 16153,
    15386, 16262, -16628, 16315, -16626, -16583, 16389, -16731, 16242, 16353,
    -16772, -16826, 15117, 15855, 16140, -16735, 15755, -16569, -16884, 15750,
    16121, 16017, -16397, 16265, -16510, 16211, 16102, 16259, 16053, 16030,
    16096, -16525, 15852, 16200, 16442, -17172, -16476, 16274, 15994, -17151,
    -16837, -16748, 15937, 15895, 16107, 16092, -16504, 16245, -16790, -16843,
    16293, 15892, 16379, -16678, 16310, -16606, -16463, 16269, -16730, -16766,
    -16592, -16826, 15868, 16188, 16189, 15690, -16588, -16579
]
K_BITS = [
    15995, 16153, -16554, 16142, 16020, 16209, -16571, 16244, 15821, 16022,
    16012, -16749, -16844, -16380, 16284, -16620, 16215, 16089, -16546, -16506,
    -16717, 16000, 16261, -16426, -16578, -16987, 16181, -16450, -16448, 16257,
    16245, 16198, -16754, 16083, -16497, 16209, 16295, -16471, -16851, 16260,
    -16837, -16474, 16172, 16058, -16545, 16399, -16622, 15756, 15992, -16500,
    -16459, -16763, -16872, -16494, -16391, 16372, -16715, -16626, 16009,
    -16607, -16414, 16050, 16095, 16083, 15802, -16370, 16429, 16362, 16268,
    16416, 16058, 15892, -17261, 16019, -16384, 16159, 16272, 16072, -16437,
    16279, 15781, 16249, 16052, -16612, -16639, -16624, 16220, 16195, 15197,
    -17451, -16528, 16245, 16197, -16626, -16563, -16633, -16774, 15971,
    -16584, 16369, 16246, 15514, -16389, -16573, 16101, 16315, 16011, -16433,
    -16599, 16130, -16654, 16274, -16741, -16740, 16009, 16088, -16457, 15830,
    -16369, -16473, 16157, -16636, -16390, -16425, 16122, -16552, -16842, 16226
]
V_BITS = [
    -16567, 16401, -16385, 16179, -16592, 16268, -16489, 16095, 16162, 16093,
    -17120, -16823, -16597, 16093, -16538, -16568, -16481, -16555, 16111,
    16283, 15895, -16506, -16453, -16580, 15875, -16507, 16285, -16631, 16105,
    15958, -16766, 16225, -16891, 15921, 16180, 16310, -16738, 16407, -16756,
    -16641, -16610, 16033, 16359, 16015, 16108, -16554, 16126, -16492, 15892,
    -16573, 16291, -16681, 16392, -16599, -16336, 16015, -16652, 15897, 15633,
    16324, 16274, 16216, 15758, 16389, 16417, -16486, 15998, -16972, 16348,
    -16722, 16253, -16638, -16757, -16602, -16737, -16945, -17101, 16036,
    -16493, 16287, -16635, -16543, 16081, 16333, 16023, -16553, -16446, -16729,
    -16703, -16868, 16281, 16049, -16951, -16375, -16628, 16294, -16472,
    -16514, -16607, -17109, 15837, -16505, 16299, 15406, -16516, -16526,
    -16575, -16699, -16528, -16680, 16173, 16281, -16868, 16069, 16071, -17175,
    -16441, 15886, -16611, 16152, 16400, -16649, 16061, 15983, 16301, -16762,
    16008, 16298
]


if __name__ == "__main__":
    sys.exit(main())
