"""Reproducer: torch SDPA, EFFICIENT_ATTENTION backend, raised.

The bug: the call raises.
What went wrong: target raised RuntimeError: p.query_ptr is not correctly
    aligned
Signature: sdpa-efficient | raised | RuntimeError: p.query_ptr is not
    correctly aligned
Case: fp16, B=1 H=1 Hkv=1 Nq=24 Nk=24 D=8, not causal, no attn_mask,
    default scale, strided layout, normal magnitudes
What is special: non-contiguous layout; strided layout; head dim not a
    multiple of 16; Nq not a multiple of 64; Nk not a multiple of 64
Found on: device cuda, targets ['sdpa-math', 'sdpa-flash',
    'sdpa-efficient', 'sdpa-cudnn'], dtypes ['fp16', 'bf16', 'fp32'], seed
    0, device cuda, model None, max_examples 100, budget 200.0, known None,
    minimize 20.0, max_seq None, shard [0, 1], exploit 0.2, narrowed to
    nothing, python 3.12.3, numpy 2.5.2, torch 2.11.0+cu130, triton 3.6.0,
    date 2026-11-22 19:05:40, gpu NVIDIA H100 80GB HBM3

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
    "fp16, B=1 H=1 Hkv=1 Nq=24 Nk=24 D=8, not causal, no attn_mask, default "
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
    q = lay_out(from_bits(Q_BITS, torch.float16, (1, 1, 24, 8)).to(device))
    k = lay_out(from_bits(K_BITS, torch.float16, (1, 1, 24, 8)).to(device))
    v = lay_out(from_bits(V_BITS, torch.float16, (1, 1, 24, 8)).to(device))
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
    14919, -17377, 13731, -17845, -17063, -16903, -19341, 15534, -17329,
    -18834, 15091, -16985, 4968, -17020, -19127, 14391, -17215, 15876, 14988,
    14212, 13645, -17990, 15636, 15582, 14768, 12501, -17171, 15781, -17259,
    -17561, 15951, -18046, -18290, 13302, 13523, 13421, -18289, -17351, -21278,
    12350, 14090, 16117, 14345, 14753, 16082, -18607, -19217, 13372, -18278,
    -18459, 13874, 15666, 14164, -20032, 15835, -18603, 12314, 12677, -18242,
    14420, 14231, 14359, 14337, 16572, -17131, 13374, -17093, -17214, -17831,
    -19338, -17984, 15369, 13095, -19086, -18928, 13542, 15798, 14311, 16029,
    -18839, -19221, -17346, 14694, -16967, 11679, 14786, 15400, 14245, 7579,
    -17010, -20851, 15535, -17301, -18022, -18145, 15723, 15576, -18670, 15793,
    -18483, 14628, -19203, -18422, 12137, -19466, -23244, 13868, 12913, 15771,
    11041, -17711, -17665, 11459, 15157, 13507, -22313, -17314, -21777, -19166,
    -20867, 14379, 15627, -19020, -16912, 11449, 14768, -23875, 16451, -16532,
    -18936, 15261, 15527, -21438, 15420, -16373, -20427, -17802, 15849, 12803,
    -24327, 15776, -18414, 14885, 13544, -18270, -18950, 8701, 15818, -16678,
    14371, -20768, 16029, -19489, -18256, 14364, 15403, -18116, 16976, -15906,
    16204, 13347, -18213, -22379, 14728, 15413, -16937, 13759, -19225, 11260,
    -17193, 13557, -19158, 12821, 14763, 13547, 15300, 14605, 13687, -21154,
    7662, 15705, -17928, -17507, 14613, -18273, -16581, 15855, 12334, -20782,
    -18612, -18907, -17396
]
K_BITS = [
    -17285, -18923, 12952, -18043, -18794, 15413, -17235, -18502, -18392,
    -17926, -20170, -17380, -16547, 15831, 15840, -16539, -20123, -18910,
    -16297, -19912, 13267, -16956, 15652, -17116, 15792, -16996, 11240, -17368,
    14766, 14739, 15437, -20930, -17386, -22207, -16795, 13889, -17768, -16844,
    11847, -20254, 15605, -22283, -16998, 14871, 14662, -17123, 14485, -18035,
    14869, -18190, 14812, -18192, -16582, 15614, 15251, -20305, 14471, 13357,
    -18182, -19869, 15095, 15096, -17329, 11681, -18703, 13563, -17044, 15089,
    -20335, -17256, -18141, -21446, -17705, 14174, 15516, 15618, -17375,
    -17216, 15262, 12784, 16402, -18262, -16123, 14009, 15210, 12538, -17358,
    13250, -18375, 14404, 16007, 14441, 15157, -17305, 15430, -19043, -17770,
    -18469, 14637, -18137, 14668, 13965, -18431, 11351, -18983, 16034, -17656,
    15073, 14058, 15300, -18347, -16329, -18872, 15859, -16398, -16764, 13917,
    15180, 16270, -21807, 12862, -20578, 16428, 14393, 15331, 14610, -18157,
    -18326, 14839, 15525, -17918, 15711, 13358, -16944, 15902, 12246, -16977,
    -16774, 14723, -18320, 14189, 11612, -17582, 15149, -16144, 15544, 14659,
    -16764, -20151, -16720, 13386, 12350, -17068, 14546, -18533, 15122, -21276,
    -18451, 11249, -19171, -18309, 14220, -16986, 14521, 13536, -17200, 14251,
    13313, 14485, 14611, -18937, -16693, -18673, -18332, 15908, 15842, 14476,
    -16338, 16098, 11404, 15391, -18271, 15112, -16701, -19428, 15770, -17416,
    -16907, 14099, -17057, 14551, 16397
]
V_BITS = [
    15437, -17995, -17142, 12910, -20319, 16234, -18767, -20160, -17863, 13229,
    14817, -18191, -18261, -20309, 15832, 16035, 15513, 14435, -17824, -17230,
    14417, 15774, 13592, -18179, 16410, 16032, 13751, 12336, 10935, -24663,
    12687, 11879, -19380, 15076, -19858, 10283, 15473, 15367, -17990, -17623,
    -18419, 12527, 15668, -19880, 12406, 14875, -17014, -16307, -19027, 15298,
    13818, 14339, 14898, 14741, 12364, 13514, 15932, 15095, -17655, -18194,
    -17958, -18423, -17533, -18314, -17188, 14139, -17868, -16579, -18215,
    15251, -17200, -19033, -18160, 13885, 14076, 15489, -18411, -18647, -18398,
    -19485, 14551, -16040, -20389, -19450, 11617, -16276, -18064, 14381,
    -17700, -20458, -20136, -18644, -18675, 15833, 14540, -16239, 15307, 12263,
    -18295, -17449, -17808, 14991, 14337, -18207, 11789, -19042, 15065, -19701,
    -19454, 14086, -17335, -19278, -22301, -21442, -19807, 15444, 15481,
    -18001, -20654, 15250, 15732, -19323, 13753, 14293, 15030, -17717, -20156,
    12179, -19555, 16299, 15356, -18755, -17529, 15921, 14594, 13775, 15137,
    15072, 15438, -16969, 15006, -17322, -26841, -18066, -16909, -20062,
    -18201, 13094, 15630, 16614, 15633, 15945, 13874, -17297, -19162, 15249,
    6260, 14548, 14185, 14036, 15820, -17354, 15216, -17638, -19360, 14867,
    12849, -17808, 15485, 14196, 13654, -18929, -19397, -18047, 13132, -19537,
    -18051, 15935, -16924, 12718, 12175, 13139, -22031, -20251, 16479, 16526,
    -20221, 15932, 14161, 15734, 15387, -18949
]


if __name__ == "__main__":
    sys.exit(main())
