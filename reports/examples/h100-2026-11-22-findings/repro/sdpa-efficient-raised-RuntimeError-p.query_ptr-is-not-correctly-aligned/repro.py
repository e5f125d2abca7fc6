"""Reproducer: torch SDPA, EFFICIENT_ATTENTION backend, raised.

The bug: the call raises.
What went wrong: target raised RuntimeError: p.query_ptr is not correctly
    aligned
Signature: sdpa-efficient | raised | RuntimeError: p.query_ptr is not
    correctly aligned
Case: fp16, B=1 H=1 Hkv=1 Nq=24 Nk=24 D=16, not causal, no attn_mask,
    default scale, strided layout, normal magnitudes
What is special: non-contiguous layout; strided layout; Nq not a multiple
    of 64; Nk not a multiple of 64
Found on: device cuda, python 3.12.3, torch 2.11.0+cu130, date 2026-11-22
    19:20:42, gpu NVIDIA H100 80GB HBM3

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
    "fp16, B=1 H=1 Hkv=1 Nq=24 Nk=24 D=16, not causal, no attn_mask, default"
    " scale, strided layout, normal magnitudes"
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
    q = lay_out(from_bits(Q_BITS, torch.float16, (1, 1, 24, 16)).to(device))
    k = lay_out(from_bits(K_BITS, torch.float16, (1, 1, 24, 16)).to(device))
    v = lay_out(from_bits(V_BITS, torch.float16, (1, 1, 24, 16)).to(device))
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
    14919, -17377, 13731, -17845, -17063, -16903, -19341, 15534, 11712, -17611,
    -19242, 14041, 16052, -18755, 16237, 15661, -17329, -18834, 15091, -16985,
    4968, -17020, -19127, 14391, -18585, 14862, -17856, -17594, -17331, 14460,
    12794, -17255, -17215, 15876, 14988, 14212, 13645, -17990, 15636, 15582,
    -18339, 14905, -18697, -18558, -17395, -16620, 6720, -17971, 14768, 12501,
    -17171, 15781, -17259, -17561, 15951, -18046, -18405, -18156, -17650,
    -16978, -19878, -17872, -17845, -19495, -18290, 13302, 13523, 13421,
    -18289, -17351, -21278, 12350, 15187, -16147, 16147, 15065, 15497, 15890,
    15439, -18664, 14090, 16117, 14345, 14753, 16082, -18607, -19217, 13372,
    -20472, 14927, -17766, -19831, -16683, 13409, 13855, 15265, -18278, -18459,
    13874, 15666, 14164, -20032, 15835, -18603, 13648, 13439, -16449, -17762,
    -17599, 14896, -19149, -18984, 12314, 12677, -18242, 14420, 14231, 14359,
    14337, 16572, -22825, 16548, 13482, -17084, 15373, 12267, 11544, 14991,
    -17131, 13374, -17093, -17214, -17831, -19338, -17984, 15369, 12841,
    -18485, -18342, 15981, -19069, -18106, -18092, -19018, 13095, -19086,
    -18928, 13542, 15798, 14311, 16029, -18839, -16762, -17263, 15657, -18188,
    -17764, 12302, 14873, 15233, -19221, -17346, 14694, -16967, 11679, 14786,
    15400, 14245, -22486, -19627, -19207, -20816, 13684, -16395, -21523, 15803,
    7579, -17010, -20851, 15535, -17301, -18022, -18145, 15723, -18442, 13316,
    -18367, -17867, -20654, 14635, 15380, 14936, 15576, -18670, 15793, -18483,
    14628, -19203, -18422, 12137, 14429, 14695, 15209, -17705, 14035, 14550,
    15159, -19126, -19466, -23244, 13868, 12913, 15771, 11041, -17711, -17665,
    -21371, -18346, -17986, -20662, -25272, -19199, 14693, 15052, 11459, 15157,
    13507, -22313, -17314, -21777, -19166, -20867, -16326, -20484, 15379,
    14683, 16179, 13699, 13788, -17143, 14379, 15627, -19020, -16912, 11449,
    14768, -23875, 16451, -20747, 15325, -16974, 15791, -16873, -18218, -17757,
    -17593, -16532, -18936, 15261, 15527, -21438, 15420, -16373, -20427, 15713,
    16030, -20281, -18560, -19213, -22196, 14525, -18305, -17802, 15849, 12803,
    -24327, 15776, -18414, 14885, 13544, -17146, 14304, -18340, -17265, 15294,
    15761, 15584, -17004, -18270, -18950, 8701, 15818, -16678, 14371, -20768,
    16029, 14217, -21221, 15890, 15059, 14477, 14988, 17106, -18683, -19489,
    -18256, 14364, 15403, -18116, 16976, -15906, 16204, 13659, -19657, -17323,
    -19954, -19001, -17541, 15517, 16028, 13347, -18213, -22379, 14728, 15413,
    -16937, 13759, -19225, 14383, -20824, 7840, 13852, 15143, 15018, -18787,
    -17156, 11260, -17193, 13557, -19158, 12821, 14763, 13547, 15300, 16328,
    -17378, 15933, -18283, 16858, 14261, -19477, -17774, 14605, 13687, -21154,
    7662, 15705, -17928, -17507, 14613, -18426, 15406, -16402, -17913, 14261,
    -18576, -17942, 14433, -18273, -16581, 15855, 12334, -20782, -18612,
    -18907, -17396, -16698, 15040, -19660, 16083, -20337, 15266, -19340, -16567
]
K_BITS = [
    -17285, -18923, 12952, -18043, -18794, 15413, -17235, -18502, 11979,
    -16820, 14136, -18437, -19007, 14567, 14647, 16398, -18392, -17926, -20170,
    -17380, -16547, 15831, 15840, -16539, -18631, 10163, 11420, -17244, -17490,
    -17211, -16818, -21886, -20123, -18910, -16297, -19912, 13267, -16956,
    15652, -17116, -18518, 13816, -17813, 16070, 11404, 14221, 15472, -16883,
    15792, -16996, 11240, -17368, 14766, 14739, 15437, -20930, -17900, -17658,
    16425, 14802, 13731, 15823, -17473, -21274, -17386, -22207, -16795, 13889,
    -17768, -16844, 11847, -20254, 12671, -17715, -17294, 14459, 15505, -17738,
    -17195, 15148, 15605, -22283, -16998, 14871, 14662, -17123, 14485, -18035,
    -18615, 16083, 15101, -17812, 15032, 15037, -21766, 16353, 14869, -18190,
    14812, -18192, -16582, 15614, 15251, -20305, 11065, -18797, -20363, 13900,
    -18265, -17861, -17904, -18299, 14471, 13357, -18182, -19869, 15095, 15096,
    -17329, 11681, -19404, -19980, -16789, -18423, -18798, 11157, -17931,
    -18481, -18703, 13563, -17044, 15089, -20335, -17256, -18141, -21446,
    13429, -18046, -20139, 15659, -17239, 13403, -18462, -20388, -17705, 14174,
    15516, 15618, -17375, -17216, 15262, 12784, 14099, 11059, 15172, 15621,
    -20073, 13604, 8559, -19089, 16402, -18262, -16123, 14009, 15210, 12538,
    -17358, 13250, 16267, -19027, 13841, 13100, 16445, 14649, -22280, -21166,
    -18375, 14404, 16007, 14441, 15157, -17305, 15430, -19043, -17568, -17918,
    -18236, 14216, -16830, 14996, -19169, 15538, -17770, -18469, 14637, -18137,
    14668, 13965, -18431, 11351, -17075, 14645, 13794, 16865, 10004, 13776,
    -16543, -19535, -18983, 16034, -17656, 15073, 14058, 15300, -18347, -16329,
    15492, 14374, 11467, -18284, -16565, -16808, -18315, 15975, -18872, 15859,
    -16398, -16764, 13917, 15180, 16270, -21807, 15552, -19154, 16472, 13257,
    -20242, 15257, -18110, 13748, 12862, -20578, 16428, 14393, 15331, 14610,
    -18157, -18326, 14611, 14356, 15523, 15414, 15817, 14457, 14286, 15459,
    14839, 15525, -17918, 15711, 13358, -16944, 15902, 12246, -19185, -17287,
    -21255, -19260, -17448, -20085, 11682, 12229, -16977, -16774, 14723,
    -18320, 14189, 11612, -17582, 15149, 12682, 14014, -18812, 15114, -19182,
    -18764, 14631, -16792, -16144, 15544, 14659, -16764, -20151, -16720, 13386,
    12350, 13321, -16303, -16442, 13126, -17966, 14477, -19080, 14820, -17068,
    14546, -18533, 15122, -21276, -18451, 11249, -19171, 15610, 16779, 14616,
    -15435, 15868, 8456, 12912, -18254, -18309, 14220, -16986, 14521, 13536,
    -17200, 14251, 13313, 14224, 14992, 14483, -17560, -17331, -17377, -18308,
    -16939, 14485, 14611, -18937, -16693, -18673, -18332, 15908, 15842, -16260,
    -18485, -17292, -16991, 15562, -17880, 12409, -17143, 14476, -16338, 16098,
    11404, 15391, -18271, 15112, -16701, -20588, 13964, -20605, -17398, 15667,
    -16889, -17935, -19606, -19428, 15770, -17416, -16907, 14099, -17057,
    14551, 16397, -18646, -17172, 14801, 14690, -16601, 15875, -16773, 15464
]
V_BITS = [
    15437, -17995, -17142, 12910, -20319, 16234, -18767, -20160, 14761, -19991,
    15146, 14561, 15884, 14601, 13358, -17020, -17863, 13229, 14817, -18191,
    -18261, -20309, 15832, 16035, 16403, -17334, 12374, -16880, 15207, -17578,
    14155, -20009, 15513, 14435, -17824, -17230, 14417, 15774, 13592, -18179,
    -18507, -17755, 13973, -16989, 13515, 15973, -21727, 15094, 16410, 16032,
    13751, 12336, 10935, -24663, 12687, 11879, -16862, -17256, 15877, 11610,
    15471, 13897, 13083, -17985, -19380, 15076, -19858, 10283, 15473, 15367,
    -17990, -17623, -16327, 12652, 13461, 13611, 15160, -16924, 15872, 14753,
    -18419, 12527, 15668, -19880, 12406, 14875, -17014, -16307, 13838, -18117,
    13393, -23187, 14461, -16837, 12098, 15807, -19027, 15298, 13818, 14339,
    14898, 14741, 12364, 13514, -18209, 13642, 11881, 12128, 12597, 9698,
    15385, 11891, 15932, 15095, -17655, -18194, -17958, -18423, -17533, -18314,
    -20073, 15390, -22738, -16787, 12866, -20134, -17204, 15445, -17188, 14139,
    -17868, -16579, -18215, 15251, -17200, -19033, 15697, 12852, 15623, -17082,
    15083, 11904, 13456, -17007, -18160, 13885, 14076, 15489, -18411, -18647,
    -18398, -19485, 13813, -15884, -18416, -17361, 13071, -17406, -20123,
    14643, 14551, -16040, -20389, -19450, 11617, -16276, -18064, 14381, -18148,
    -17527, 13563, 12293, -17267, -15950, 15387, 14878, -17700, -20458, -20136,
    -18644, -18675, 15833, 14540, -16239, -19418, -20367, -18996, 14751,
    -18125, 15153, -17691, 12444, 15307, 12263, -18295, -17449, -17808, 14991,
    14337, -18207, -16722, 12341, 16453, -17621, 13090, 15410, 11713, 16290,
    11789, -19042, 15065, -19701, -19454, 14086, -17335, -19278, -19430, 15506,
    -18444, 13665, -17013, 13701, -16159, 11845, -22301, -21442, -19807, 15444,
    15481, -18001, -20654, 15250, 15362, 15074, -16882, -19575, -17756, 13957,
    -18970, -17133, 15732, -19323, 13753, 14293, 15030, -17717, -20156, 12179,
    -19304, -18293, -17902, -19074, 16031, 15040, 13590, 15364, -19555, 16299,
    15356, -18755, -17529, 15921, 14594, 13775, -18836, 12962, 12048, -19737,
    -18355, -16274, -16645, 15994, 15137, 15072, 15438, -16969, 15006, -17322,
    -26841, -18066, 14793, -18146, -16577, -17992, -18125, -18806, 13812, 9478,
    -16909, -20062, -18201, 13094, 15630, 16614, 15633, 15945, 14337, -16071,
    15364, -20638, 15341, 15147, -17071, -18128, 13874, -17297, -19162, 15249,
    6260, 14548, 14185, 14036, 14807, -21332, -22230, -17775, 14743, 10378,
    -16352, 16079, 15820, -17354, 15216, -17638, -19360, 14867, 12849, -17808,
    -17718, -17375, 16548, 16266, 9928, 14730, -17185, 14924, 15485, 14196,
    13654, -18929, -19397, -18047, 13132, -19537, -17858, -19235, 16432,
    -17450, 15450, -18309, 15502, 15232, -18051, 15935, -16924, 12718, 12175,
    13139, -22031, -20251, 14695, -16365, 14429, -18038, -17465, -16979, 15360,
    10002, 16479, 16526, -20221, 15932, 14161, 15734, 15387, -18949, -17325,
    -18755, 14363, -16623, -18184, -21509, -18158, 11986
]


if __name__ == "__main__":
    sys.exit(main())
