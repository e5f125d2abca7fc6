"""Reproducer: torch SDPA, EFFICIENT_ATTENTION backend, raised.

The bug: the call raises.
What went wrong: target raised RuntimeError: p.query_ptr is not correctly
    aligned
Signature: sdpa-efficient | raised | RuntimeError: p.query_ptr is not
    correctly aligned
Case: fp16, B=1 H=1 Hkv=1 Nq=8 Nk=8 D=24, not causal, no attn_mask, default
    scale, strided layout, normal magnitudes
What is special: non-contiguous layout; strided layout; head dim not a
    multiple of 16; Nq not a multiple of 64; Nk not a multiple of 64; dO
    huge
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
    "fp16, B=1 H=1 Hkv=1 Nq=8 Nk=8 D=24, not causal, no attn_mask, default "
    "scale, strided layout, normal magnitudes"
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
    q = lay_out(from_bits(Q_BITS, torch.float16, (1, 1, 8, 24)).to(device))
    k = lay_out(from_bits(K_BITS, torch.float16, (1, 1, 8, 24)).to(device))
    v = lay_out(from_bits(V_BITS, torch.float16, (1, 1, 8, 24)).to(device))
    attn_mask = None
    return q, k, v, attn_mask


# -- the call under test ------------------------------------------------------


def run_kernel(q, k, v, attn_mask):
    """The failing call: SDPA with the EFFICIENT_ATTENTION backend forced."""
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
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
    """The failure was the call raising.
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


# Raw bit patterns (float16 as int16), flattened in (B, H, N, D) order.
Q_BITS = [
    13364, 15922, -17775, 15877, 15348, -18881, -16468, 14273, 13607, -19331,
    16529, 9563, -18315, 14700, -17364, 15556, -17337, -20330, -18383, -17287,
    12286, 15421, -17493, 9730, -17304, 12526, -18232, 15103, -17083, -16060,
    -20076, -18352, -18059, 15816, 14834, -21342, 14930, 15258, 15737, -17126,
    -17695, 11465, 14768, 11522, -20890, 15785, -17563, 15023, -16970, -16562,
    -19778, 11568, 14242, -17791, 16793, -23752, 15084, 16021, -18757, -18503,
    15492, 15180, 15395, -17966, -17477, 12133, -16998, -17498, -20408, -18095,
    16358, 15626, -17323, 14430, -16387, -18063, -18960, 13374, -20227, 16792,
    10210, 13345, -18023, -18310, -18360, -18840, 13367, 9974, -17267, -17140,
    10196, -17687, -18408, 14943, 12846, 15642, 12940, -17233, 13689, 15144,
    14640, -17116, 13752, -17344, 14572, 12175, 12218, -19731, 14796, -16057,
    13403, 16431, -16898, 14976, 15229, -18184, 15295, 14399, 15409, -16850,
    -17559, 14477, -19459, 15466, -17226, -18320, -17747, -16954, -18043,
    11886, 14565, -20548, 13538, -17042, 14760, -19249, -17302, 15755, 13176,
    -16673, 15291, 16232, -17061, 12570, -18377, 14796, -20358, 14139, -21315,
    12646, 16037, 14114, -19948, -18219, -19490, 14436, 14721, -18033, 14419,
    15988, -16502, -19063, 13770, 15295, -19386, 16363, -16668, 10443, 13355,
    15180, 14564, 14230, 12255, -21696, 11347, 14798, 10110, 15406, 15801,
    -17160, -17289, 14776, 14393, 13540, -20863, 13772, 14209, -17928, 15271,
    11851, 15248, 15101
]
K_BITS = [
    15150, 16092, -17306, 15820, -15804, -18181, 15418, 13024, 14073, -19083,
    -18140, 13268, 13466, 8947, -16387, 14673, -17754, -17165, 12660, 14814,
    -20357, 15904, 14806, 14521, -18801, -18144, 15697, 14828, -18165, -18613,
    -16315, 12709, 15849, -21035, 8986, -17867, 10369, 15202, 16323, -17402,
    15981, 13310, -18329, -19319, -17221, -17229, 13644, -23953, -18446, 13493,
    15583, -22410, 13477, 15884, -16629, -19723, -19872, 13329, -17915, 16039,
    15466, 14336, -17345, 15851, 15883, -19365, 13362, -17323, 14892, -17384,
    -17471, 13392, -16278, 15575, 10527, 15959, 11703, 15850, -19325, -19444,
    -17003, 15364, -17980, -17269, 16128, -20772, -16948, -17574, 16318,
    -20380, 13481, -16383, -17218, 14427, 13115, 15485, -17523, 12638, 13770,
    -17913, 13838, 13715, -17320, -18127, -19001, -17601, -18237, -17345,
    -16331, -20950, -16938, -17118, -21752, 12466, 15445, 13808, 14871, -16370,
    -19989, -19726, -19569, -16852, -16750, 14705, 16000, 16288, 15177, 14484,
    -18684, -17097, 13167, -19684, -18310, -18051, 15782, 13704, -17946, 12681,
    -18300, -18249, -20498, -18696, 15130, -19388, -16969, 14648, -17050,
    -17861, -18977, -17240, 14887, -18061, 12148, -16002, -18203, -17900,
    15437, -18370, -18072, 14163, -18979, 14903, 13979, 15907, 16530, -17387,
    -19217, -17580, -18168, -17040, 11368, -17476, -21103, 13982, 12071,
    -16833, -20296, 14422, 14004, 14827, -23460, -19592, 15808, 16251, -17317,
    12741, -17649, -16774, -17492, -21340, 14964, -20178
]
V_BITS = [
    14292, 14052, 12612, -16708, -20847, 14707, 13874, 12460, -17093, -18325,
    14653, -17035, -20420, 15309, 12558, -18890, 14013, -17294, 16394, 15419,
    15569, -18263, -17060, -16828, 14248, 14667, 11134, 16216, -17206, 14855,
    14763, -17972, -20388, -16513, -19025, -17016, 14971, -16781, 15594, 15483,
    15590, 16373, -17354, -18221, 14577, -18714, 15747, -17132, -16750, 16176,
    -17166, 16016, -17811, 14928, 12710, -17267, -19036, -24916, -17733,
    -18893, -18372, -19097, 15827, 15249, 14668, -19628, -20171, 13220, 14962,
    14364, -17178, -16859, 14041, 9153, 16101, 15263, 16016, 8958, -15993,
    15504, -19360, 14580, 15313, 13530, 11959, 14720, -21573, 16087, -18497,
    -18968, -16348, -18848, 14735, -16606, -17171, -17066, 14252, 14348, 16831,
    -17642, 15510, 16069, 15889, 13384, -17853, 16230, 14790, -18702, -17625,
    14806, -17224, 15602, 14759, -16533, 15165, -19367, 13922, -16943, 14190,
    -19614, -19740, 14138, -17183, -17280, 15881, 15118, -16864, -17350, 14848,
    -17206, 11271, -18230, 15751, 14847, 15454, 15969, 16775, -18303, -16978,
    12773, -16290, 13603, 14480, 15862, 14582, 13687, -18199, 15406, -18151,
    14925, 15666, -18349, -21480, 13799, 14546, -18782, -17371, 15587, 15517,
    12428, 16139, 14891, -17744, -20688, 12331, 15523, -17059, -16309, -17885,
    15981, 12798, 14377, 15283, -17391, -17419, 15649, -17263, 12886, -19813,
    -18552, 13428, 15875, 13647, 10334, -16751, 13496, -17568, -19250, -17821,
    12299, 12500, 14817
]


if __name__ == "__main__":
    sys.exit(main())
