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
    magnitude fa3-outliers
Found on: device cuda, python 3.12.3, torch 2.11.0+cu130, date 2026-11-22
    19:33:49, gpu NVIDIA H100 80GB HBM3

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
    16143, 16156, 16031, -16475, 16135, 15504, -16613, -16873, 16262, 16201,
    -16687, -16638, 15777, -16502, 15942, 15535, -16616, 16129, -16570, -16705,
    -16590, 16221, -16665, 16304, 16086, -16390, 16130, 16228, 16310, 16026,
    16228, -16797, -16550, 15816, 15923, -16610, 16389, 16132, -16531, 16132,
    16402, -16738, -16334, -16695, -16517, 16238, 16346, -16597, -16449, 16225,
    16096, -16639, 16327, 16115, 16143, -16388, -16878, -16548, -16776, -16602,
    16284, -16753, -16859, -16369, -16747, 16293, 15774, -16480, -16636, 16190,
    -16502, -16678, 16132, 16396, -16340, 16159, -16556, -16599, -16739,
    -16562, -16571, -16914, -16378, 16245, -16538, -16497, 16213, 16079, 16010,
    -16497, 16279, -16553, -16726, -16746, 16300, -16692, 16144, -16499, 16105,
    16182, -17021, 16297, 15978, 16153, -16592, -16559, 16095, -16420, 16050,
    -16800, -16645, -16604, 16235, 16193, 16080, 16028, -16461, -16406, 15993,
    16154, -16491, -16457, -16673, -16429, -16966, 16004, 16079, -16787
]
K_BITS = [
    16048, -16483, 15744, 16103, 16273, -16511, -16402, -16474, -16909, -16627,
    -16562, -17123, 15805, 16259, -16444, -16639, 16173, -16562, -16656,
    -16535, -16499, 16198, 15495, 15402, -16713, -16811, 15878, -16424, -16613,
    16347, -16432, 16274, 16009, -16452, 16039, 16090, 16130, 16390, 16163,
    16296, -16709, 16159, 16065, -16965, 16222, -16477, -16617, 16283, 16225,
    -17124, -16436, 15938, 16294, -16493, -16793, -16494, 16367, 16140, 16287,
    16084, -17144, 15966, 16112, -16481, 16301, -16618, -16406, 16303, 16382,
    -16641, -17426, -16494, -16647, -16448, 16324, 15882, 15914, -16435,
    -17531, -16659, 15652, 15924, -16585, -16574, -16504, -16592, 16257,
    -16639, -16569, -16497, -16428, -16618, -16401, -17039, 16345, 16389,
    15985, 16139, -16503, -16469, 16310, 16135, 16314, 16284, 16309, -16451,
    -16471, -16506, -16796, 16226, 16155, -16470, -16458, -16663, 16112, 15985,
    -16686, 15581, -16951, 16258, 16259, -16877, -16405, -16907, -16710,
    -16624, -16483, 16067
]
V_BITS = [
    -16618, -16484, -16427, -17563, -16510, -16799, -16611, -16560, 16155,
    15746, 15751, 16344, 16046, -16464, 16085, 16156, 16003, -16608, -16515,
    -16431, -16905, 16117, 16264, 15891, -16811, -16941, 16329, 16201, 16160,
    16315, -16458, -16633, 15891, -16475, -16455, 16017, -16565, 16205, 16355,
    -16609, 16323, 16149, 16233, -16688, 15807, 16225, 16117, -16688, 16130,
    16331, 16295, -16426, -16523, -16443, 16269, -16513, 15977, 16268, 16120,
    16164, 15769, 16219, 16241, 16043, 16291, 15992, -16495, 16246, -16662,
    16262, -16654, -16841, 16141, 16209, -16744, -16631, -16681, 16128, -16726,
    16125, -16503, -16513, 16171, -16455, -16979, -16868, 16211, 16302, 16164,
    16195, -16502, -16503, 16201, -16931, -16515, -16501, 16090, -16557, 16154,
    16300, -17075, 16307, -16579, -16586, -16432, 16295, 16119, 16188, -16559,
    16333, 15955, 15802, -16457, -16575, 16301, -16474, 15893, -16451, 16029,
    -16612, 16210, -16766, -16469, 15899, -16371, 15987, 16195, 16131
]


if __name__ == "__main__":
    sys.exit(main())
