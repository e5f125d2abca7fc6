"""Reproducer: torch SDPA, EFFICIENT_ATTENTION backend, grad-wrong.

The bug: a gradient's error at the failing element exceeds the certified
    bound.
What went wrong: gradient: dq error 4.78e-06 exceeds bound 3.14e-06 at (0,
    0, 0, 32) (ratio 1.52, model fa2+gpu); row (0, 0, 0): row in last
    partial query tile, row sees the last partial key tile
Signature: sdpa-efficient | grad-wrong | dq gradient beyond the bound
Case: fp16, B=1 H=1 Hkv=1 Nq=1 Nk=14 D=48 Dv=16, not causal, no attn_mask,
    scale=1.0, contiguous layout, normal magnitudes
What is special: row in last partial query tile; row sees the last partial
    key tile; Dv != D; Nq not a multiple of 64; Nk not a multiple of 64;
    single query; explicit scale; dO huge
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
    "fp16, B=1 H=1 Hkv=1 Nq=1 Nk=14 D=48 Dv=16, not causal, no attn_mask, "
    "scale=1.0, contiguous layout, normal magnitudes"
)
AT = (0, 0, 0, 32)  # failing element of dq (b, h, i, d)
GRADIENT = "dq"  # the failing gradient
ALLOWED = 3.135468281610993e-06  # |observed - expected| allowed at AT
ALLOWED_MAX = 0.005377017402785384  # the largest error allowed in dq
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
    q = lay_out(from_bits(Q_BITS, torch.float16, (1, 1, 1, 48)).to(device))
    k = lay_out(from_bits(K_BITS, torch.float16, (1, 1, 14, 48)).to(device))
    v = lay_out(from_bits(V_BITS, torch.float16, (1, 1, 14, 16)).to(device))
    do = lay_out(from_bits(DO_BITS, torch.float16, (1, 1, 1, 16)).to(device))
    attn_mask = None
    return q, k, v, attn_mask, do


# -- the call under test ------------------------------------------------------


def run_kernel(q, k, v, attn_mask):
    """The failing call: SDPA with the EFFICIENT_ATTENTION backend forced."""
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
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
    print(f"{GRADIENT} of query (b={b}, h={h}, i={i}),",
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


# Raw bit patterns (float16 as int16), flattened in (B, H, N, D) order.
Q_BITS = [
    14900, -19841, 14369, -17963, -18160, 14717, -17034, -17348, -19964,
    -16273, 9337, -18571, -18971, -17354, -18555, 15786, -18852, -16774,
    -15683, -20769, -17965, 13450, 13583, 10881, -17477, 16115, -17352, -17124,
    14848, -17628, -17470, -17475, 14884, -16912, 16471, 16479, -18541, -17982,
    13341, 15900, -17804, -19529, -17601, 15064, 15094, 11648, 14583, -16756
]
K_BITS = [
    -18312, -17842, -18710, 11718, -18398, -16615, 14007, 13166, 15718, -18336,
    -19755, 15421, -18992, 14238, 14122, -20161, -17436, 12310, -17126, -16691,
    -19060, 11552, 15565, -16908, 16734, -18099, -16589, 16144, -17233, -16154,
    7907, -17076, 16185, 13413, 15216, 14930, 12595, -16989, 15442, -19290,
    -19650, 12342, 11947, 13538, 16282, -19337, 14895, 15002, 12746, 15071,
    -18227, -17933, -17648, 14725, 15661, -17389, 6336, 13808, -18148, -19930,
    15300, -18878, 15081, -17106, 13985, -16324, -18715, -17206, 15322, 13653,
    -18665, -19417, -18920, 15378, 15504, 15415, 14463, 16299, 15145, 14842,
    13789, 16484, 15626, 16154, -19246, -18897, 8091, -16772, -18044, -18514,
    -16659, -16418, -18069, 15665, 15562, 14924, -18310, 15172, -17930, -17537,
    -19504, 14531, -21806, 12255, -20476, 15868, -17210, -19419, 11377, -16867,
    -23645, 14740, -16283, -19452, -22288, 13488, -18292, -19137, 15341, 15384,
    13508, -17358, -18369, -20494, 16219, 14386, 13769, 15768, 11545, -19972,
    16517, 15505, 10849, -20134, -17523, 14786, -16391, 13338, -18166, -17265,
    -19383, 14369, 15326, -18253, -19400, 14565, -17263, 14215, -19762, 15129,
    -17871, -18369, -17385, 14696, -16878, -17591, 15550, 14262, 15428, -21426,
    14998, -18621, -17325, 13329, 14830, 15480, 13814, -17398, 15429, 13998,
    -19688, 13798, 15704, 12510, 14167, 14991, 14739, -21881, -17242, -17768,
    -17939, 14321, -17714, -17300, 14743, 14538, -19420, -15584, -18731,
    -16191, 11954, 14831, -17122, 14700, 13425, -18167, 14547, -17287, -17139,
    15111, 15662, -17642, -18318, 12888, 15356, -17935, 16296, 12366, -16607,
    15681, 15478, 14513, 15372, -17807, -18521, 15154, 12302, -28673, 15905,
    -19399, -20086, 16421, -18934, 14184, -19656, -21037, -17371, 13388, 12397,
    -17443, 14679, 14721, 14376, 14878, 15760, 14620, 13864, -19352, 14616,
    -17331, -17492, -17264, -17046, 15485, -19546, 14472, -23289, 14149,
    -20028, 13419, 12892, 14774, 13342, 10576, 16162, -18371, 16575, 7903,
    15468, -17709, 15474, -18356, -20757, -20081, 14608, 15382, 14491, 15515,
    12069, -17988, -18263, 14668, -17335, -20006, 12811, -16957, 15724, 14307,
    -20726, 14813, -16870, 15026, 15904, -17424, 16308, -17735, 13090, -16795,
    16096, 14595, 15608, 14872, 13014, -17644, 14975, 14656, -17391, -20714,
    14089, 15376, 14490, -18923, 16152, -22506, -18589, 13482, -18286, 12946,
    14668, -20322, 15655, -17493, 14883, 15455, -18353, 15760, 12301, 17038,
    -17199, 11198, 16274, 1896, 13768, 14542, 13896, -18355, 15773, -16138,
    -18318, 13628, 12238, -18376, -20264, -19071, 14848, 15344, 15550, 15884,
    13200, 15951, 15591, 15883, -16598, -18298, -17881, -19438, -17226, -20912,
    15196, -18674, -17996, -19671, -18212, 13823, 14929, 14682, -19608, 12580,
    15884, 13570, -17899, 14973, 14507, 15779, -18366, -18058, -18280, -17246,
    15183, -17975, -17188, 13382, -17051, 14494, 14026, -18264, 12069, -17869,
    -17211, -17162, 14720, -19055, -20077, -20259, 14673, -18236, -18129,
    12762, -18130, 15675, -19980, 15792, -20983, -18188, 12868, 10614, -19505,
    15411, -17747, 14853, 16026, 14064, 15173, 13525, 15357, 11714, 14853,
    -16829, -15871, -16418, -17339, -18763, 15747, 15480, -17380, 16356,
    -16804, 13047, 14556, -17906, -18090, -17820, -16598, 15198, 15614, 11477,
    12513, -19282, -19197, 15404, 12990, 15662, -16993, 14103, -16986, -17511,
    12584, -16667, -19980, -16839, -16168, 15495, -20456, -19260, -19410,
    15044, -19637, -17921, -16697, -17177, -17870, 13995, 15269, 14733, -18197,
    -19494, 15261, 16285, -17682, 15176, 12471, 14688, -17767, -18084, -16989,
    14835, 14520, 14873, 13173, -19170, 13102, 15151, 15268, 10688, 12733,
    -15799, 14508, -17200, 13063, 12809, -20443, 13826, -16633, -17977, -17346,
    15780, -23128, 16653, -16743, 13443, -17021, -19344, 16099, -19002, 15346,
    14977, -19366, -19427, -17146, 14528, 16728, -18015, -16521, -19450,
    -16808, -17075, -19012, 15191, -17451, 14540, -19097, -19751, -17151,
    -19734, -17155, -16403, -16350, -20226, 15461, -17398, -18357, 14740,
    15056, 15584, -17662, 14968, -17321, -20060, 14935, 15007, 13330, -16980,
    15009, 14555, -21440, -16851, 16481, 14160, 12365, 14867, 14528, -18402,
    -18408, 15264, -16767, 11344, 14252, 14471, 16442, 16613, -17924, -21608,
    -17088, 15603, 16395, -18957, 16581, -21870, 16081, -17502, -17012, -16114,
    -21046, 13815, 14792, -19958, 13780, -19453, 12357, 13914, 16134, -18316,
    -20213, 16193, -19427, 15658, -17337, 16500, 12823, 11588, 15023, -17869,
    15605, 14804, 14503, -19219, 14816, -19570, -17316, -19586, 15199, 14538,
    11233, 15531, -17263, 15429, 14530, 12926, 16220, 16347, 15612, -19878,
    13700, -20243, -18910, 15229, -17720, -19485, -20852, -18240, -19254,
    -19341, -18446, 12182, 15424, 16438, 15633, 14597, 14094, -16795, 15780,
    13994, -18174, 14207, 13379, -16902, 13901, -18052, 14473, -19369, -17399,
    -17477, -20642, -17487, -17355, -17756, -19795, -17275, 16389, -22154,
    13710, -17165, -16827, -17578, 14472, 15570, -18873, 14550, -16701, 13066,
    -19080, 14423, 12618, 14018, -20519, -18132, -26964, -18206, -18185, 16471,
    -17892, -17194, -19301, 12667, 16037, -15728, -17053, 15858, 13971, 16428,
    -20365, -17826
]
V_BITS = [
    14192, -16900, -19445, -18164, 15391, -18704, -16948, -18731, -19184,
    -16667, 10008, 14582, -17274, -16409, -20289, 16686, 11904, -17932, -20032,
    15532, -17343, -17254, -21407, 13336, -17621, 14407, -18062, -19696,
    -19370, -16394, -17175, 14804, -22256, 11940, 13110, -17054, -17290, 10916,
    16083, 15328, 15530, 14350, 14497, -18822, -17695, -19385, 15952, 15993,
    -17689, -17251, -17805, -17853, 14509, -19318, 13570, -16837, -18457,
    15635, -19174, -19748, 14637, 11805, 14711, 13715, 14691, 10641, 15362,
    14280, -17245, -17447, -20926, -17169, -17163, 10137, 14763, -18412, 13039,
    14716, 16585, -19621, 15288, 16673, -17551, -17010, -17309, 14858, -18277,
    -20628, -16509, 16131, -19033, -16551, -16729, 15737, -17350, 14703,
    -16954, 14539, 15027, 15518, 13992, 15437, -19090, 14637, -16446, 11607,
    11836, -19892, 12844, -16888, -19578, -17364, -17245, -16532, -20650,
    12939, -18097, -17101, -16370, 12604, 15564, -18987, -17571, 14421, -17100,
    -19005, 15948, 15678, 15056, -17806, -19231, 14548, -16375, 14382, 15668,
    15883, 16085, 15029, -22570, -19076, 13890, 14546, -17391, -16975, -18373,
    -21007, -20527, -18628, 16391, -17749, -20096, -17850, 15020, -16717,
    -21344, -24174, 14852, -18619, -20079, 12396, -17318, -18065, 12885,
    -18053, -15760, -19746, -19465, -17564, -17363, 11785, -17927, 14578,
    -17370, 14026, -18076, 15326, -17647, 11672, -17926, 14725, 8840, 14565,
    13316, -17981, -20089, 14873, 11248, 15379, 14499, -17190, 17054, 15563,
    -16349, 14706, -16426, -16934, -23556, -16301, 11867, 15835, 15304, 11905,
    15549, 9067, -18421, 15604, -17110, 15494, 14487, -18303, 14099, 14197,
    16360, -18095, -19460, 13229, -19035, -19454, -17191, -17219, -17904,
    15975, 15399, 12908
]
DO_BITS = [
    19576, 20053, -13744, 20158, -11799, 21427, -14276, -12518, 20443, -11583,
    11301, 20270, 21119, -11982, 20697, -15309
]


if __name__ == "__main__":
    sys.exit(main())
