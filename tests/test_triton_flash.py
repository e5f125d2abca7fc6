"""The Triton flash-attention kernel against float64 SDPA, on the CPU interpreter.

Tolerances come from the precision model, not from observed errors. For
the output the bound is

    |out - ref| <= max|V| * (4 u_p + 4 delta)

u_p the unit roundoff P is rounded to (the input format; tf32 for fp32
with tf32 dots), 4 u_p covering the roundings of P, of the output, of the
fp32 divide and exp2 with a factor two of slack; delta bounds the logit
error, scale * max(|Q||K|^T) * (2 u_dot + D u_32) with u_dot the unit
roundoff of the dot inputs (0 when the products are exact in fp32), and a
logit error delta perturbs each weight p_j/l by at most about 2 delta.

Gradients are sums of products of quantities each rounded a bounded number
of times (P and dS to the input format, fp32 accumulation), so each is
held to 8 u_eff times the same sum taken over absolute values:
dv: |P|^T |dO|; dk: scale |dS_abs|^T |Q|; dq: scale |dS_abs| |K| with
dS_abs = P * (|dO||V|^T + rowsum|O * dO|), u_eff = max(u_p, D u_32) + delta.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashcheck.kernels.precision import FORMATS  # noqa: E402
from flashcheck.kernels.triton_flash import (  # noqa: E402
    attention,
    default_blocks,
    is_interpreted,
    precision_model,
)

pytestmark = pytest.mark.interpreted_kernel  # skipped where the host's Triton interpreter is too old

DEVICE = "cpu" if is_interpreted() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("kernels compiled for GPU but no CUDA device", allow_module_level=True)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
U32 = FORMATS["fp32"].u


# --------------------------------------------------------------------------
# reference and error budget of these tests (test-only: the GPU check script
# judges with the package's oracle and derived bounds instead)
# --------------------------------------------------------------------------
def reference(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, do=None):
    """float64 SDPA on the exact inputs: (out, lse, grads or None, parts)."""
    qd, kd, vd = (x.detach().double().requires_grad_(do is not None) for x in (q, k, v))
    mask = attn_mask
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # SDPA's math path wants 4-D
        if mask.dtype != torch.bool:
            mask = mask.double()
    out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=enable_gqa)
    grads = None
    if do is not None:
        grads = torch.autograd.grad(out, (qd, kd, vd), do.double())
    # Probabilities, for the error budget.
    H, Hkv = q.shape[1], k.shape[1]
    ke = kd.detach().repeat_interleave(H // Hkv, dim=1)
    ve = vd.detach().repeat_interleave(H // Hkv, dim=1)
    sc = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    logits = sc * qd.detach() @ ke.transpose(-1, -2)
    Nq, Nk = q.shape[2], k.shape[2]
    if is_causal:
        vis = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~vis, -math.inf)
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = torch.where(torch.isfinite(lse).unsqueeze(-1), out.detach(), 0.0)  # fully masked rows: 0
    parts = {"p": p, "k": ke, "v": ve, "scale": sc}
    return out, lse, grads, parts


def unit_roundoffs(dtype, allow_tf32=False, device=DEVICE):
    """(u_p, u_dot): P's format and the dot inputs' rounding (0 if exact)."""
    model = precision_model(dtype, allow_tf32=allow_tf32, device=device)
    u_in = FORMATS[model.input].u
    if model.tf32:
        return FORMATS["tf32"].u, FORMATS["tf32"].u
    return u_in, 0.0


def logit_error(q, k, parts, u_dot):
    D = q.shape[-1]
    absdot = q.detach().double().abs() @ parts["k"].abs().transpose(-1, -2)
    return parts["scale"] * absdot.max().item() * (2 * u_dot + D * U32)


def out_tolerance(q, k, v, parts, dtype, allow_tf32=False, device=DEVICE):
    u_p, u_dot = unit_roundoffs(dtype, allow_tf32, device)
    delta = logit_error(q, k, parts, u_dot)
    return v.detach().double().abs().max().item() * (4 * u_p + 4 * delta)


def grad_tolerances(q, k, v, out, do, parts, dtype, allow_tf32=False, device=DEVICE):
    u_p, u_dot = unit_roundoffs(dtype, allow_tf32, device)
    D = q.shape[-1]
    u_eff = max(u_p, D * U32) + logit_error(q, k, parts, u_dot)
    p, ke, ve, sc = parts["p"], parts["k"], parts["v"], parts["scale"]
    qa, doa = q.detach().double().abs(), do.double().abs()
    ds_abs = p * (doa @ ve.abs().transpose(-1, -2)
                  + (out.detach().double().abs() * doa).sum(-1, keepdim=True))
    H, Hkv = q.shape[1], k.shape[1]
    B, _, Nk, _ = k.shape

    def group_sum(x):  # (B, H, Nk, D) -> (B, Hkv, Nk, D)
        return x.view(B, Hkv, H // Hkv, Nk, D).sum(2)

    tol_dq = 8 * u_eff * sc * (ds_abs @ ke.abs()).max().item()
    tol_dk = 8 * u_eff * sc * group_sum(ds_abs.transpose(-1, -2) @ qa).max().item()
    tol_dv = 8 * u_eff * group_sum(p.transpose(-1, -2) @ doa).max().item()
    return tol_dq, tol_dk, tol_dv


def max_err(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def make(B, H, Hkv, Nq, Nk, D, dtype, layout="contiguous", seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def one(h, n):
        x = torch.randn((B, h, n, D), generator=gen).to(dtype).to(DEVICE)
        if layout == "bnhd":
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        elif layout == "strided":  # padded batch, head and row strides; NaN in the gaps
            big = torch.full((B + 1, h + 2, n, D + 5), float("nan"), dtype=dtype, device=DEVICE)
            big[1:, 2:, :, 5:] = x
            x = big[1:, 2:, :, 5:]
        return x.requires_grad_(requires_grad) if requires_grad else x

    return one(H, Nq), one(Hkv, Nk), one(Hkv, Nk)


def check_forward(q, k, v, dtype, allow_tf32=False, block_m=None, block_n=None, **kw):
    out, lse = attention(q, k, v, return_lse=True, block_m=block_m, block_n=block_n,
                         allow_tf32=allow_tf32, **kw)
    ref, ref_lse, _, parts = reference(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert torch.isfinite(out).all(), "non-finite output from finite inputs"
    tol = out_tolerance(q, k, v, parts, dtype, allow_tf32)
    err = max_err(out, ref)
    assert err <= tol, f"output error {err:.3g} > budget {tol:.3g}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite.cpu())
    assert (lse[~finite] == -math.inf).all()
    if finite.any():
        lse_err = (lse.double() - ref_lse)[finite].abs().max().item()
        # lse = m + log2(l) in fp32 times ln 2: a few fp32 ulps of |lse| + logit error.
        lse_tol = 8 * U32 * ref_lse[finite].abs().max().item() + 1e-6 \
            + 2 * logit_error(q, k, parts, unit_roundoffs(dtype, allow_tf32)[1])
        assert lse_err <= lse_tol, f"lse error {lse_err:.3g} > {lse_tol:.3g}"
    return out, lse, err, tol


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("Nq,Nk", [(1, 17), (17, 33), (33, 1), (100, 17)])
def test_forward_ragged_lengths(dtype, Nq, Nk):
    q, k, v = make(1, 2, 2, Nq, Nk, 32, DTYPES[dtype], seed=Nq * 1000 + Nk)
    check_forward(q, k, v, dtype)


@pytest.mark.parametrize("D", [16, 59, 64, 80, 111])
def test_forward_head_dims(D):
    q, k, v = make(1, 2, 2, 19, 23, D, torch.float16, seed=D)
    check_forward(q, k, v, "fp16")


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("Nq,Nk", [(17, 40), (40, 17), (33, 33)])
def test_forward_causal_top_left(dtype, Nq, Nk):
    q, k, v = make(1, 2, 2, Nq, Nk, 16, DTYPES[dtype], seed=7 + Nq)
    out, *_ = check_forward(q, k, v, dtype, is_causal=True)
    # Row 0 sees key 0 only: its output is v[..., 0, :] rounded.
    assert torch.equal(out[:, :, 0], v[:, :, 0])


@pytest.mark.parametrize("shape", [(20, 30), (1, 1, 20, 30), (2, 1, 1, 30), (1, 2, 20, 1), (30,)])
def test_forward_bool_mask_broadcast(shape):
    gen = torch.Generator().manual_seed(3)
    q, k, v = make(2, 2, 2, 20, 30, 16, torch.float16, seed=11)
    mask = torch.rand(shape, generator=gen) > 0.4
    mask.view(-1)[0] = True
    check_forward(q, k, v, "fp16", attn_mask=mask.to(DEVICE))


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_forward_additive_mask(dtype):
    gen = torch.Generator().manual_seed(5)
    q, k, v = make(2, 2, 2, 20, 30, 16, DTYPES[dtype], seed=12)
    mask = (torch.randn((2, 1, 20, 30), generator=gen) * 3).to(DTYPES[dtype])
    mask[0, 0, 2, 5:] = -math.inf
    check_forward(q, k, v, dtype, attn_mask=mask.to(DEVICE))


def test_fully_masked_rows_give_zero_and_minus_inf_lse():
    q, k, v = make(1, 2, 2, 9, 20, 16, torch.float16, seed=13)
    mask = torch.ones(9, 20, dtype=torch.bool)
    mask[4] = False
    mask[7, :] = False
    out, lse, *_ = check_forward(q, k, v, "fp16", attn_mask=mask.to(DEVICE))
    assert (out[:, :, [4, 7]] == 0).all()
    assert (lse[:, :, [4, 7]] == -math.inf).all()
    assert torch.isfinite(lse[:, :, [0, 1, 2, 3, 5, 6, 8]]).all()
    add = torch.zeros(9, 20, dtype=torch.float16)
    add[2] = -math.inf
    out, lse = attention(q, k, v, attn_mask=add.to(DEVICE), return_lse=True)
    assert (out[:, :, 2] == 0).all() and (lse[:, :, 2] == -math.inf).all()
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1), (6, 3)])
def test_forward_gqa_mqa(H, Hkv):
    q, k, v = make(1, H, Hkv, 18, 21, 16, torch.bfloat16, seed=H * 10 + Hkv)
    check_forward(q, k, v, "bf16", enable_gqa=True)


@pytest.mark.parametrize("layout", ["bnhd", "strided"])
def test_forward_non_contiguous_layouts(layout):
    q, k, v = make(2, 2, 2, 17, 19, 24, torch.float16, layout=layout, seed=21)
    assert not q.is_contiguous()
    out, *_ = check_forward(q, k, v, "fp16", is_causal=True)
    # The same bits laid out contiguously give the same bits out: no hidden copy changes arithmetic.
    ref = attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True)
    assert torch.equal(out, ref)


def test_forward_last_dim_not_unit_stride_is_copied():
    q, k, v = make(1, 2, 2, 9, 11, 16, torch.float16, seed=22)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    assert torch.equal(attention(qt, k, v), attention(q, k, v))


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 64), (4, 8), (1, 2)])
def test_forward_block_sizes(block_m, block_n):
    q, k, v = make(1, 1, 1, 21, 37, 16, torch.float16, seed=31)
    check_forward(q, k, v, "fp16", is_causal=True, block_m=block_m, block_n=block_n)


def test_block_size_changes_only_rounding():
    q, k, v = make(1, 2, 2, 40, 40, 16, torch.float32, seed=41)
    a = attention(q, k, v, block_m=16, block_n=16)
    b = attention(q, k, v, block_m=32, block_n=32)
    assert max_err(a, b) <= 1e-5  # different tiling, same function
    assert torch.equal(a, attention(q, k, v, block_m=16, block_n=16))  # deterministic


def test_scale_argument():
    q, k, v = make(1, 2, 2, 12, 13, 16, torch.float32, seed=51)
    check_forward(q, k, v, "fp32", scale=0.3)
    a = attention(q, k, v, scale=0.3)
    b = attention(q, k, v)
    assert max_err(a, b) > 1e-3  # the scale is used


def test_large_logits_stay_finite():
    q, k, v = make(1, 1, 1, 16, 40, 16, torch.float16, seed=61)
    q = q * 30  # logits near 900/4: exp would overflow without the running max
    out, lse, *_ = check_forward(q, k, v, "fp16")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_return_lse_matches_logsumexp():
    q, k, v = make(1, 2, 2, 10, 30, 16, torch.float32, seed=71)
    _, lse = attention(q, k, v, return_lse=True)
    _, ref_lse, _, _ = reference(q, k, v)
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------
def check_backward(B, H, Hkv, Nq, Nk, D, dtype, seed, mask=None, layout="contiguous", **kw):
    tdt = DTYPES[dtype]
    q, k, v = make(B, H, Hkv, Nq, Nk, D, tdt, layout=layout, seed=seed, requires_grad=True)
    do = torch.randn((B, H, Nq, D), generator=torch.Generator().manual_seed(seed + 1)).to(tdt).to(DEVICE)
    out = attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv, **kw)
    out.backward(do)
    ref_kw = {key: val for key, val in kw.items() if key not in ("block_m", "block_n")}
    ref, _, grads, parts = reference(q, k, v, attn_mask=mask, enable_gqa=H != Hkv, do=do, **ref_kw)
    tols = grad_tolerances(q, k, v, out, do, parts, dtype)
    for name, got, want, tol in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), grads, tols):
        assert got.shape == want.shape and got.dtype == tdt
        assert torch.isfinite(got).all(), f"{name} not finite"
        err = max_err(got, want.nan_to_num(0.0))
        assert err <= tol, f"{name} error {err:.3g} > budget {tol:.3g}"


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_backward_plain(dtype):
    check_backward(1, 2, 2, 17, 33, 32, dtype, seed=101)


@pytest.mark.parametrize("Nq,Nk", [(17, 40), (40, 17)])
def test_backward_causal(Nq, Nk):
    check_backward(1, 2, 2, Nq, Nk, 16, "fp16", seed=102 + Nq, is_causal=True)


@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1)])
def test_backward_gqa(H, Hkv):
    check_backward(1, H, Hkv, 19, 23, 16, "bf16", seed=103 + Hkv)


def test_backward_bool_mask_with_fully_masked_row():
    mask = torch.rand((1, 1, 20, 30), generator=torch.Generator().manual_seed(9)) > 0.3
    mask[..., 5, :] = False
    check_backward(2, 2, 2, 20, 30, 16, "fp16", seed=104, mask=mask)


def test_backward_additive_mask_odd_head_dim():
    mask = (torch.randn((2, 2, 20, 30), generator=torch.Generator().manual_seed(8)) * 2).to(torch.float32)
    check_backward(2, 2, 2, 20, 30, 59, "fp32", seed=105, mask=mask)


def test_backward_non_contiguous():
    check_backward(1, 2, 2, 17, 19, 16, "fp16", seed=106, layout="bnhd", is_causal=True)


def test_backward_block_sizes():
    check_backward(1, 2, 1, 21, 27, 16, "fp16", seed=107, is_causal=True, block_m=32, block_n=16)


def test_mask_gets_no_gradient():
    q, k, v = make(1, 1, 1, 5, 6, 16, torch.float32, seed=108, requires_grad=True)
    mask = torch.zeros(5, 6, requires_grad=True)
    attention(q, k, v, attn_mask=mask).sum().backward()
    assert mask.grad is None and q.grad is not None


# --------------------------------------------------------------------------
# precision model and defaults
# --------------------------------------------------------------------------
def test_precision_model_fields():
    m = precision_model(torch.bfloat16)
    fields = (m.input, m.p, m.out, m.qk_acc, m.l_acc, m.pv_acc)
    assert fields == ("bf16", "bf16", "bf16", "fp32", "fp32", "fp32")
    assert m.exp_impl == "exp2" and m.exp_rel_err == 2.0**-22 and m.acc_rounding == "zero"
    assert precision_model("fp32", allow_tf32=True).tf32
    assert not precision_model("fp32", allow_tf32=False).tf32
    assert not precision_model("fp32", allow_tf32=True, device="cpu").tf32  # interpreter ignores tf32
    assert precision_model("fp16", device="cpu").acc_rounding == "nearest"


def test_default_blocks():
    assert default_blocks(64, "cpu") == (16, 16)
    for d in (16, 59, 64, 111, 128, 160, 256):
        bm, bn = default_blocks(d, "cuda", "dq")
        assert bm >= 16 and bn >= 16 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------
def _t(*shape, dtype=torch.float16):
    return torch.randn(shape).to(dtype).to(DEVICE)


_Q = (1, 2, 4, 16)
BAD_CALLS = [
    ("rank", lambda: attention(_t(2, 4, 16), _t(2, 4, 16), _t(2, 4, 16)), ValueError, "rank 4"),
    ("not tensor", lambda: attention([1.0], _t(*_Q), _t(*_Q)), TypeError, "torch.Tensor"),
    ("batch", lambda: attention(_t(*_Q), _t(2, 2, 4, 16), _t(2, 2, 4, 16)), ValueError, "batch"),
    ("head dim", lambda: attention(_t(*_Q), _t(1, 2, 4, 32), _t(1, 2, 4, 32)), ValueError, "head dims"),
    ("k v shapes", lambda: attention(_t(*_Q), _t(1, 2, 4, 16), _t(1, 2, 5, 16)), ValueError, "shapes differ"),
    ("gqa off", lambda: attention(_t(1, 4, 4, 16), _t(1, 2, 4, 16), _t(1, 2, 4, 16)),
     ValueError, "enable_gqa"),
    ("gqa divisible", lambda: attention(_t(1, 3, 4, 16), _t(1, 2, 4, 16), _t(1, 2, 4, 16), enable_gqa=True),
     ValueError, "multiple"),
    ("mixed dtypes", lambda: attention(_t(*_Q), _t(*_Q, dtype=torch.float32), _t(*_Q)), TypeError, "dtype"),
    ("float64", lambda: attention(*(_t(*_Q, dtype=torch.float64),) * 3), TypeError, "unsupported dtype"),
    ("int", lambda: attention(*(torch.ones(_Q, dtype=torch.int32),) * 3), TypeError, "unsupported dtype"),
    ("head dim > 256", lambda: attention(*(_t(1, 1, 2, 257),) * 3), ValueError, "head dim"),
    ("head dim 0", lambda: attention(*(_t(1, 1, 2, 0),) * 3), ValueError, "head dim"),
    ("empty N", lambda: attention(_t(1, 2, 0, 16), _t(*_Q), _t(*_Q)), ValueError, "empty"),
    ("mask shape", lambda: attention(*(_t(*_Q),) * 3, attn_mask=torch.ones(3, 4, dtype=torch.bool)),
     ValueError, "broadcast"),
    ("mask rank", lambda: attention(*(_t(*_Q),) * 3, attn_mask=torch.ones(1, 1, 1, 4, 4, dtype=torch.bool)),
     ValueError, "rank"),
    ("mask dtype", lambda: attention(*(_t(*_Q),) * 3, attn_mask=torch.zeros(4, 4)), TypeError, "attn_mask"),
    ("mask int", lambda: attention(*(_t(*_Q),) * 3, attn_mask=torch.zeros(4, 4, dtype=torch.int8)),
     TypeError, "attn_mask"),
    ("causal+mask", lambda: attention(*(_t(*_Q),) * 3, attn_mask=torch.ones(4, 4, dtype=torch.bool),
                                      is_causal=True), ValueError, "mutually exclusive"),
    ("scale nan", lambda: attention(*(_t(*_Q),) * 3, scale=float("nan")), ValueError, "scale"),
    ("scale inf", lambda: attention(*(_t(*_Q),) * 3, scale=float("inf")), ValueError, "scale"),
    ("scale 0", lambda: attention(*(_t(*_Q),) * 3, scale=0.0), ValueError, "scale"),
    ("scale neg", lambda: attention(*(_t(*_Q),) * 3, scale=-1.0), ValueError, "scale"),
    ("scale str", lambda: attention(*(_t(*_Q),) * 3, scale="1"), TypeError, "scale"),
    ("block not pow2", lambda: attention(*(_t(*_Q),) * 3, block_m=24), ValueError, "block_m"),
    ("block zero", lambda: attention(*(_t(*_Q),) * 3, block_n=0), ValueError, "block_n"),
    ("block too big", lambda: attention(*(_t(*_Q),) * 3, block_n=512), ValueError, "block_n"),
    ("block float", lambda: attention(*(_t(*_Q),) * 3, block_m=16.0), TypeError, "block_m"),
    ("causal int", lambda: attention(*(_t(*_Q),) * 3, is_causal=1), TypeError, "is_causal"),
    ("tf32 str", lambda: attention(*(_t(*_Q),) * 3, allow_tf32="yes"), TypeError, "allow_tf32"),
    ("model dtype", lambda: precision_model(torch.float64), ValueError, "unsupported dtype"),
    ("model device", lambda: precision_model("fp16", device="tpu"), ValueError, "device"),
]


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_invalid_arguments(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the interpreter's bf16 rounding workaround")
def test_bf16_output_rounds_to_nearest_even_on_cpu():
    # q = 0: both keys weigh 1, out = (v0 + v1) / 2 exactly in fp32, then one
    # rounding to bf16. Ties to even differ from the interpreter's truncation.
    import numpy as np

    from flashcheck.kernels.precision import round_to

    q = torch.zeros((1, 1, 1, 64), dtype=torch.bfloat16)
    v = torch.randn((1, 1, 2, 64), generator=torch.Generator().manual_seed(3)).bfloat16()
    out = attention(q, v, v)
    want = round_to(((v[0, 0, 0].double() + v[0, 0, 1].double()) / 2).numpy(), "bf16")
    assert np.array_equal(out[0, 0, 0].double().numpy(), want)
