"""Flash attention in Triton, forward and backward: the kernel under test.

`attention` follows ``torch.nn.functional.scaled_dot_product_attention``
on (B, H, N, D) tensors: fp16, bf16 or fp32; any Nq, Nk >= 1; head dims
1..256 (zero padded inside the kernel to a power of two); top-left causal
masking; boolean or additive masks read through broadcast strides; GQA/MQA;
any strides whose last one is 1. It is differentiable (FlashAttention-2
backward, see `_bwd_dkdv_kernel` and `_bwd_dq_kernel`).

The arithmetic follows one contract, stated by `precision_model` and
modelled step by step by the NumPy emulation:

    c     = fl32(scale * log2 e)                 (host, once)
    S     = Q K^T                                 (fp32 accumulation)
    t     = fl32(S * c)   [+ fl32(mask * log2e)]  (additive masks)
    m     = running row max of t
    p     = exp2(fl32(t - m))                     (fp32, ex2.approx on GPU)
    alpha = exp2(fl32(m_old - m_new))
    l     = fl32(fl32(l * alpha) + rowsum(p))     (p unrounded, fp32)
    acc   = acc * alpha + fl_in(p) V              (P in the input dtype)
    out   = fl_out(fl32(acc / l))                 (correctly rounded divide)
    lse   = fl32(fl32(m + log2 l) * ln 2)

Floating-point contraction (FMA fusion) is switched off at launch so that
the compiler cannot merge ``S * c - m`` or ``l * alpha + s`` into one
rounding the contract does not have.

On CPU tensors the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1`` must be set before this module is imported). The
interpreter multiplies bf16 bit patterns as integers in ``tl.dot``, so the
CPU path (``UPCAST`` constexpr) converts dot inputs to fp32 first, which is
exact for fp16 and bf16 products.

>>> import torch
>>> q = k = v = torch.randn(1, 2, 5, 16)
>>> attention(q, k, v).shape            # doctest: +SKIP
torch.Size([1, 2, 5, 16])
"""

from __future__ import annotations

import re

import torch
import triton
import triton.language as tl

from flashcheck.kernels.models import EX2_APPROX_REL_ERR, INTERP_EXP2_REL_ERR
from flashcheck.kernels.precision import PrecisionModel
from flashcheck.kernels.sdpa_args import SdpaArgs, check_sdpa_args

__all__ = ["attention", "precision_model", "default_blocks", "is_interpreted", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_FORMATS = ("fp16", "bf16", "fp32")  # the input dtypes the kernel supports


@triton.jit
def _f32(x):
    """x widened to fp32 exactly. The interpreter's own bf16 -> fp32
    conversion loses bf16 subnormals (pinned in tests/test_triton_interpreter.py),
    so bf16 goes through its bits: a bf16 is the top half of an fp32."""
    if x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _to_p(x, P_DTYPE: tl.constexpr, UPCAST: tl.constexpr, RN_BF16: tl.constexpr):
    """x rounded to P's format; fp32 when UPCAST (the interpreter's dots).

    The interpreter converts fp32 -> bf16 toward zero (pinned in
    tests/test_triton_interpreter.py); RN_BF16 rounds to nearest-even on
    the bits instead, as the GPU's cvt.rn does, so the CPU path keeps the
    contract.
    """
    if RN_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif UPCAST:
        return x.to(P_DTYPE).to(tl.float32)
    else:
        return x.to(P_DTYPE)


# --------------------------------------------------------------------------
# prologue helpers shared by the kernels (inlined by the compiler)
# --------------------------------------------------------------------------
@triton.jit
def _program_heads(H, GROUP):
    """(pid_bh, b, h, hk) of this program: grid axis 1 runs over B * H, so
    batch b = pid_bh // H and head h = pid_bh % H; hk = h // GROUP is the kv
    head that query head h reads (GQA), h itself when GROUP is 1."""
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    return pid_bh, b, h, h // GROUP


@triton.jit
def _head_offset(b, h, stride_b, stride_h):
    """Element offset of the (N, D) slab of batch b, head h, in int64: b and
    h are int32 and b * stride_b alone overflows int32 for tensors of more
    than 2**31 elements. Offsets inside a slab (row * stride_n + col) stay
    int32, as a slab of 2**31 elements is out of reach of one program."""
    return b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _row_offset(bh, Nq):
    """Offset of row 0 of head ``bh`` (= b * H + h) in a contiguous
    (B, H, Nq) fp32 tensor (the LSE, Delta), in int64 for the same reason."""
    return bh.to(tl.int64) * Nq


@triton.jit
def _load_rows(base, offs_r, offs_d, stride_r, N, D: tl.constexpr, UPCAST: tl.constexpr):
    """The rows ``offs_r`` of an (N, D) slab with row stride ``stride_r`` and
    unit column stride, as a (len(offs_r), len(offs_d)) tile: rows >= N and
    columns >= D (head-dim padding) read 0. Widened to fp32 if UPCAST."""
    x = tl.load(base + offs_r[:, None] * stride_r + offs_d[None, :],
                mask=(offs_r[:, None] < N) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        x = _f32(x)
    return x


@triton.jit
def _store_rows(base, x, offs_r, offs_d, stride_r, N, D: tl.constexpr):
    """Store the tile ``x`` (already in the output dtype) where `_load_rows`
    would read it; rows >= N and columns >= D are left alone."""
    tl.store(base + offs_r[:, None] * stride_r + offs_d[None, :], x,
             mask=(offs_r[:, None] < N) & (offs_d[None, :] < D))


@triton.jit
def _apply_mask(t, mask_base, offs_m, offs_n, stride_mq, stride_mk, Nq, Nk,
                MASK_BOOL: tl.constexpr, TRANS: tl.constexpr):
    """The mask tile of queries ``offs_m`` and keys ``offs_n`` applied to the
    base-2 logits ``t``: (queries, keys), or (keys, queries) when TRANS (the
    dk/dv kernel). Bool masks set hidden entries to -inf; additive masks add
    fl32(mask * log2 e). Out-of-range entries read 0 (callers hide them).
    The pointer sums keep the order each layout had before (the compiler
    does not reassociate them, and the other order costs 64-bit adds)."""
    if TRANS:
        mval = tl.load(mask_base + offs_m[None, :] * stride_mq + offs_n[:, None] * stride_mk,
                       mask=(offs_m[None, :] < Nq) & (offs_n[:, None] < Nk), other=0)
    else:
        mval = tl.load(mask_base + offs_m[:, None] * stride_mq + offs_n[None, :] * stride_mk,
                       mask=(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk), other=0)
    if MASK_BOOL:
        t = tl.where(mval != 0, t, float("-inf"))
    else:
        t = t + _f32(mval) * 1.4426950408889634
    return t


@triton.jit
def _load_row_stats(Lse2, Delta, row_base, offs_m, Nq):
    """(lse2, delta) of query rows ``offs_m``; a fully masked row's lse2 of
    -inf reads as 0, so that its p = exp2(-inf - 0) = 0 rather than NaN."""
    lse2 = tl.load(Lse2 + row_base + offs_m, mask=offs_m < Nq, other=0.0)
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
    delta = tl.load(Delta + row_base + offs_m, mask=offs_m < Nq, other=0.0)
    return lse2, delta


# --------------------------------------------------------------------------
# forward kernel
# --------------------------------------------------------------------------
@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, mask_base,
    stride_kn, stride_vn, stride_mq, stride_mk,
    offs_m, offs_d, Nq, Nk, c, lo, hi,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    UPCAST: tl.constexpr, IN_PREC: tl.constexpr, P_DTYPE: tl.constexpr, RN_BF16: tl.constexpr,
):
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        # Unmasked loads where the tile is known to be in range (the hot loop).
        if BOUNDS:
            kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < Nk) & (offs_d[:, None] < D), other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < Nk) & (offs_d[None, :] < D), other=0.0)
        elif D != D_PAD:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < D, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:
            kt = _f32(kt)
        s = tl.dot(q, kt, input_precision=IN_PREC)
        t = s * c
        if HAS_MASK:
            t = _apply_mask(t, mask_base, offs_m, offs_n, stride_mq, stride_mk, Nq, Nk, MASK_BOOL, False)
        if CAUSAL:
            t = tl.where(offs_n[None, :] <= offs_m[:, None], t, float("-inf"))
        if BOUNDS:
            t = tl.where(offs_n[None, :] < Nk, t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, 1))
        # A row with nothing visible yet keeps m = -inf; subtracting 0 instead
        # keeps p = exp2(-inf) = 0 and alpha = 0 rather than NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(t - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        pc = _to_p(p, P_DTYPE, UPCAST, RN_BF16)
        if UPCAST:
            v = _f32(v)
        acc = tl.dot(pc, v, acc, input_precision=IN_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Mask, Out, Lse2,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_ob, stride_oh, stride_on,
    H, GROUP, Nq, Nk, c,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    UPCAST: tl.constexpr, IN_PREC: tl.constexpr, P_DTYPE: tl.constexpr, RN_BF16: tl.constexpr,
):
    """One query block of one head; loops over key blocks."""
    pid_bh, b, h, hk = _program_heads(H, GROUP)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    k_base = K + _head_offset(b, hk, stride_kb, stride_kh)
    v_base = V + _head_offset(b, hk, stride_vb, stride_vh)
    mask_base = Mask + _head_offset(b, h, stride_mb, stride_mh)

    q = _load_rows(Q + _head_offset(b, h, stride_qb, stride_qh), offs_m, offs_d, stride_qn, Nq, D, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    if HAS_MASK:
        # Every tile reads the mask anyway: one masked loop over all keys.
        hi = Nk
        if CAUSAL:
            hi = tl.minimum(start_m + BLOCK_M, Nk)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mq, stride_mk,
            offs_m, offs_d, Nq, Nk, c, 0, hi, D, D_PAD, BLOCK_N,
            True, CAUSAL, True, MASK_BOOL, UPCAST, IN_PREC, P_DTYPE, RN_BF16)
    else:
        # Blocks every row of this tile sees in full run without masking;
        # the causal diagonal and the ragged tail follow, masked. Skipped
        # blocks would add p = 0 exactly, so skipping changes no bit.
        if CAUSAL:
            full = (tl.minimum(start_m + 1, Nk) // BLOCK_N) * BLOCK_N
            hi = tl.minimum(start_m + BLOCK_M, Nk)
        else:
            full = (Nk // BLOCK_N) * BLOCK_N
            hi = Nk
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mq, stride_mk,
            offs_m, offs_d, Nq, Nk, c, 0, full, D, D_PAD, BLOCK_N,
            False, False, False, False, UPCAST, IN_PREC, P_DTYPE, RN_BF16)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mq, stride_mk,
            offs_m, offs_d, Nq, Nk, c, full, hi, D, D_PAD, BLOCK_N,
            True, CAUSAL, False, False, UPCAST, IN_PREC, P_DTYPE, RN_BF16)

    # Fully masked rows have l = 0 and acc = 0: output 0, lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.math.div_rn(acc, l_safe[:, None])
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    if RN_BF16:
        out = _to_p(out, P_DTYPE, UPCAST, RN_BF16)  # exact in bf16 now: the store cannot truncate
    _store_rows(Out + _head_offset(b, h, stride_ob, stride_oh), out.to(Out.dtype.element_ty),
                offs_m, offs_d, stride_on, Nq, D)
    tl.store(Lse2 + _row_offset(pid_bh, Nq) + offs_m, lse2, mask=offs_m < Nq)


# --------------------------------------------------------------------------
# backward kernels (FlashAttention-2: P recomputed from the saved base-2 LSE)
# --------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, Nq,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta_i = rowsum(dO * O) in fp32."""
    pid_bh, b, h, _ = _program_heads(H, 1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    # fp32 on every device: the sum is taken in fp32 whatever the input dtype.
    o = _load_rows(Out + _head_offset(b, h, stride_ob, stride_oh), offs_m, offs_d, stride_on, Nq, D, True)
    do = _load_rows(DO + _head_offset(b, h, stride_dob, stride_doh), offs_m, offs_d, stride_don, Nq, D, True)
    tl.store(Delta + _row_offset(pid_bh, Nq) + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Mask, DO, Lse2, Delta, DK, DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, HKV, GROUP, Nq, Nk, c, sm_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    UPCAST: tl.constexpr, IN_PREC: tl.constexpr, P_DTYPE: tl.constexpr, RN_BF16: tl.constexpr,
):
    """One key block of one kv head; loops over the query heads of its GQA
    group and over query blocks, so dk, dv sum the group without atomics."""
    _, b, hk, _ = _program_heads(HKV, 1)  # grid axis 1 runs over B * HKV here
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k = _load_rows(K + _head_offset(b, hk, stride_kb, stride_kh), offs_n, offs_d, stride_kn, Nk, D, UPCAST)
    v = _load_rows(V + _head_offset(b, hk, stride_vb, stride_vh), offs_n, offs_d, stride_vn, Nk, D, UPCAST)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # queries i < start_n see none of these keys
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + _head_offset(b, h, stride_qb, stride_qh)
        do_base = DO + _head_offset(b, h, stride_dob, stride_doh)
        mask_base = Mask + _head_offset(b, h, stride_mb, stride_mh)
        row_base = _row_offset(b * H + h, Nq)
        for start_m in range(lo, Nq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, offs_m, offs_d, stride_qn, Nq, D, UPCAST)
            do = _load_rows(do_base, offs_m, offs_d, stride_don, Nq, D, UPCAST)
            lse2, delta = _load_row_stats(Lse2, Delta, row_base, offs_m, Nq)
            tt = tl.dot(k, tl.trans(q), input_precision=IN_PREC) * c  # (BLOCK_N, BLOCK_M)
            if HAS_MASK:
                tt = _apply_mask(tt, mask_base, offs_m, offs_n, stride_mq, stride_mk, Nq, Nk, MASK_BOOL, True)
            if CAUSAL:
                tt = tl.where(offs_n[:, None] <= offs_m[None, :], tt, float("-inf"))
            tt = tl.where((offs_n[:, None] < Nk) & (offs_m[None, :] < Nq), tt, float("-inf"))
            pt = tl.math.exp2(tt - lse2[None, :])
            ptc = _to_p(pt, P_DTYPE, UPCAST, RN_BF16)
            dv = tl.dot(ptc, do, dv, input_precision=IN_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=IN_PREC)
            dst = _to_p(pt * (dpt - delta[None, :]), P_DTYPE, UPCAST, RN_BF16)
            dk = tl.dot(dst, q, dk, input_precision=IN_PREC)
    dk = dk * sm_scale
    if RN_BF16:
        dk = _to_p(dk, P_DTYPE, UPCAST, RN_BF16)
        dv = _to_p(dv, P_DTYPE, UPCAST, RN_BF16)
    _store_rows(DK + _head_offset(b, hk, stride_dkb, stride_dkh), dk.to(DK.dtype.element_ty),
                offs_n, offs_d, stride_dkn, Nk, D)
    _store_rows(DV + _head_offset(b, hk, stride_dvb, stride_dvh), dv.to(DV.dtype.element_ty),
                offs_n, offs_d, stride_dvn, Nk, D)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Mask, DO, Lse2, Delta, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, GROUP, Nq, Nk, c, sm_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    UPCAST: tl.constexpr, IN_PREC: tl.constexpr, P_DTYPE: tl.constexpr, RN_BF16: tl.constexpr,
):
    """One query block; loops over key blocks."""
    pid_bh, b, h, hk = _program_heads(H, GROUP)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(Q + _head_offset(b, h, stride_qb, stride_qh), offs_m, offs_d, stride_qn, Nq, D, UPCAST)
    do = _load_rows(DO + _head_offset(b, h, stride_dob, stride_doh), offs_m, offs_d, stride_don, Nq, D, UPCAST)
    lse2, delta = _load_row_stats(Lse2, Delta, _row_offset(pid_bh, Nq), offs_m, Nq)
    k_base = K + _head_offset(b, hk, stride_kb, stride_kh)
    v_base = V + _head_offset(b, hk, stride_vb, stride_vh)
    mask_base = Mask + _head_offset(b, h, stride_mb, stride_mh)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    hi = Nk
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, Nk)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, Nk, D, UPCAST)
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, Nk, D, UPCAST)
        t = tl.dot(q, tl.trans(k), input_precision=IN_PREC) * c
        if HAS_MASK:
            t = _apply_mask(t, mask_base, offs_m, offs_n, stride_mq, stride_mk, Nq, Nk, MASK_BOOL, False)
        if CAUSAL:
            t = tl.where(offs_n[None, :] <= offs_m[:, None], t, float("-inf"))
        t = tl.where((offs_n[None, :] < Nk) & (offs_m[:, None] < Nq), t, float("-inf"))
        p = tl.math.exp2(t - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=IN_PREC)
        ds = _to_p(p * (dp - delta[:, None]), P_DTYPE, UPCAST, RN_BF16)
        dq = tl.dot(ds, k, dq, input_precision=IN_PREC)
    dq = dq * sm_scale
    if RN_BF16:
        dq = _to_p(dq, P_DTYPE, UPCAST, RN_BF16)
    _store_rows(DQ + _head_offset(b, h, stride_dqb, stride_dqh), dq.to(DQ.dtype.element_ty),
                offs_m, offs_d, stride_dqn, Nq, D)


# --------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------
#: The oldest Triton whose interpreter runs these kernels: Triton 3.6's hands
#: run-time loop bounds (tl.range(lo, hi) with lo, hi from program ids) to
#: Python's range() as 1-element arrays and fails; 3.9 runs them. 3.7 and 3.8
#: are untested. Compiled GPU kernels are not affected.
INTERPRETER_MIN_TRITON = (3, 9)


def interpreter_supported() -> bool:
    """False when the kernels would run under a Triton interpreter too old for them."""
    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    return not is_interpreted() or version >= INTERPRETER_MIN_TRITON


def is_interpreted() -> bool:
    """True when this module's kernels run under Triton's CPU interpreter
    (``TRITON_INTERPRET=1`` was set when the module was imported)."""
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def _padded_head_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


#: GPU forward launch configurations by padded head dim: (BLOCK_M, BLOCK_N,
#: num_warps, num_stages), from the sweep in scripts/gpu_kernel_check.py on
#: an H100 (bf16, N=4096; docs/performance.md).
_GPU_FWD = {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 64, 4, 3),
            256: (64, 32, 4, 2)}
#: GPU backward: the dk/dv kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages)
#: and the dq kernel's; an explicit block_m/block_n applies to both.
_GPU_BWD = {16: ((64, 64, 4, 2), (64, 64, 4, 2)), 32: ((64, 64, 4, 2), (64, 64, 4, 2)),
            64: ((32, 128, 4, 3), (128, 64, 8, 3)), 128: ((64, 64, 4, 2), (128, 64, 8, 3)),
            256: ((32, 32, 4, 1), (32, 32, 4, 1))}
#: fp32 tiles take twice the shared memory: smaller tiles from D_PAD >= 128.
_GPU_FP32_BIG = (32, 32, 4, 1)


def _gpu_config(d_pad: int, dtype, kernel: str) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) for "fwd", "dkdv" or "dq"."""
    if dtype == torch.float32 and d_pad >= 128:
        return _GPU_FP32_BIG
    if kernel == "fwd":
        return _GPU_FWD[d_pad]
    return _GPU_BWD[d_pad][0 if kernel == "dkdv" else 1]


def _fit_blocks(bm: int, bn: int, d_pad: int, dtype, kernel: str) -> tuple[int, int]:
    """Explicit GPU block sizes, capped where the tiles would not fit.

    At head dims padded to 256 (and for fp32 from 128) a 128 x 128 tile pair
    needs more shared memory than an H100 SM has (the fuzzer found
    OutOfResources in the backward and ptxas running out of registers). Tile
    sizes do not enter the precision contract, so capping them changes
    speed, not the checks."""
    big = d_pad >= 256 or (dtype == torch.float32 and d_pad >= 128)
    if not big:
        return bm, bn
    cap = 32 if (kernel != "fwd" or dtype == torch.float32) else 64
    return min(bm, cap), min(bn, cap)


def default_blocks(head_dim: int, device: str = "cuda", kernel: str = "fwd",
                   dtype=torch.float16) -> tuple[int, int]:
    """Default (block_m, block_n) for a head dim on a device type; ``kernel``
    is "fwd", "dkdv" or "dq".

    >>> default_blocks(64, "cpu")
    (16, 16)
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be an int in [1, {MAX_HEAD_DIM}], got {head_dim!r}")
    if kernel not in ("fwd", "dkdv", "dq"):
        raise ValueError(f"kernel must be 'fwd', 'dkdv' or 'dq', got {kernel!r}")
    if device == "cpu":
        return (16, 16)  # the interpreter's cost grows with tile area; small tiles are fastest there
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    bm, bn, _, _ = _gpu_config(_padded_head_dim(head_dim), dtype, kernel)
    return bm, bn


def _check_block(name: str, value, on_cpu: bool):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    least = 1 if on_cpu else 16
    if value < least or value > 256 or value & (value - 1):
        where = "on the CPU interpreter" if on_cpu else "on GPU"
        raise ValueError(f"{name} must be a power of two in [{least}, 256] {where}, got {value}")


def _validate(q, k, v, attn_mask, is_causal, scale, enable_gqa, block_m, block_n, allow_tf32) -> SdpaArgs:
    """The shared SDPA checks, then what only this kernel needs: torch
    tensors on one CUDA device (or the CPU under the interpreter), fp16,
    bf16 or fp32, Dv == D <= MAX_HEAD_DIM, and valid block sizes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    args = check_sdpa_args(q, k, v, attn_mask, is_causal, scale, enable_gqa, formats=_FORMATS)
    if args.Dv != args.D:
        raise ValueError(f"v's head dim {args.Dv} differs from q's and k's {args.D}; this kernel needs "
                         f"Dv == D (pad v or use another backend)")
    if args.D > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}] for this kernel, got {args.D}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {q.device}; expected cpu (interpreter) or cuda")
    if q.device.type == "cpu" and not is_interpreted():
        raise ValueError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing "
                         "flashcheck.kernels.triton_flash")
    if q.device.type == "cuda" and is_interpreted():
        raise ValueError("the kernels were loaded under TRITON_INTERPRET=1; pass CPU tensors")
    if attn_mask is not None and attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device}, q on {q.device}; move it to q's device")
    if allow_tf32 is not None and not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool or None, got {type(allow_tf32).__name__}")
    on_cpu = q.device.type == "cpu"
    _check_block("block_m", block_m, on_cpu)
    _check_block("block_n", block_n, on_cpu)
    if not interpreter_supported():
        raise RuntimeError(
            f"Triton {triton.__version__}'s interpreter cannot run this kernel (its loop bounds are run-time "
            f"values, which interpreters before {'.'.join(map(str, INTERPRETER_MIN_TRITON))} mishandle); "
            f"install triton>={'.'.join(map(str, INTERPRETER_MIN_TRITON))} for the CPU path, or run on a GPU")
    return args


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels assume unit stride in the head dim (vector loads); copy otherwise.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _mask_args(attn_mask, q, B, H, Nq, Nk):
    """(tensor, strides, is_bool) with the mask broadcast by strides alone."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), False  # never read
    m = attn_mask.expand(B, H, Nq, Nk)  # stride-0 view, no copy
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return m, tuple(m.stride()), attn_mask.dtype == torch.bool


def _consts(q, allow_tf32):
    upcast = q.device.type == "cpu"
    if q.dtype == torch.float32:
        in_prec = "tf32" if allow_tf32 else "ieee"
        p_dtype = tl.float32
    else:
        in_prec = "ieee"  # unused by fp16/bf16 dots
        p_dtype = tl.float16 if q.dtype == torch.float16 else tl.bfloat16
    return upcast, in_prec, p_dtype, upcast and q.dtype == torch.bfloat16


def _store_dtype(t: torch.Tensor) -> torch.dtype:
    """The interpreter narrows fp32 to bf16 wrongly for subnormals (pinned in
    tests/test_triton_interpreter.py): on the CPU, bf16 results are stored as
    fp32 (already rounded to bf16 in the kernel) and narrowed by torch."""
    return torch.float32 if t.device.type == "cpu" and t.dtype == torch.bfloat16 else t.dtype


def _forward(q, k, v, attn_mask, is_causal, c, block_m, block_n, allow_tf32, launch=None, fp_fusion=False):
    """Launch the forward kernel; ``launch`` = (num_warps, num_stages) and
    ``fp_fusion`` override the defaults (for the benchmark's sweep only:
    fusion breaks the rounding contract)."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    d_pad = _padded_head_dim(D)
    on_cpu = q.device.type == "cpu"
    dbm, dbn = default_blocks(D, q.device.type, "fwd", q.dtype)
    bm, bn = block_m or dbm, block_n or dbn
    if not on_cpu:
        bm, bn = _fit_blocks(bm, bn, d_pad, q.dtype, "fwd")
    out = torch.empty((B, H, Nq, D), dtype=_store_dtype(q), device=q.device)
    lse2 = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    mask, ms, mask_bool = _mask_args(attn_mask, q, B, H, Nq, Nk)
    upcast, in_prec, p_dtype, rn_bf16 = _consts(q, allow_tf32)
    kwargs = {}
    if not on_cpu:
        warps, stages = launch or _gpu_config(d_pad, q.dtype, "fwd")[2:]
        kwargs = {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": fp_fusion}
    grid = (triton.cdiv(Nq, bm), B * H)
    _fwd_kernel[grid](
        q, k, v, mask, out, lse2,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *ms,
        out.stride(0), out.stride(1), out.stride(2),
        H, H // Hkv, Nq, Nk, c,
        D=D, D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn,
        CAUSAL=is_causal, HAS_MASK=attn_mask is not None, MASK_BOOL=mask_bool,
        UPCAST=upcast, IN_PREC=in_prec, P_DTYPE=p_dtype, RN_BF16=rn_bf16, **kwargs,
    )
    return out.to(q.dtype), lse2


def _backward(do, q, k, v, out, lse2, attn_mask, is_causal, c, sm_scale, block_m, block_n, allow_tf32,
              configs=None):
    """dq, dk, dv. ``configs`` = (dkdv, dq) launch tuples (block_m, block_n,
    num_warps, num_stages) override the GPU defaults (benchmark sweep)."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    d_pad = _padded_head_dim(D)
    on_cpu = q.device.type == "cpu"
    do = _unit_last(do)
    launch = {}
    for kernel in ("dkdv", "dq"):
        if on_cpu:
            bm, bn, extra = 16, 16, {}
        else:
            bm, bn, warps, stages = configs[kernel == "dq"] if configs else _gpu_config(d_pad, q.dtype, kernel)
            extra = {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False}
        bm, bn = block_m or bm, block_n or bn
        if not on_cpu:
            bm, bn = _fit_blocks(bm, bn, d_pad, q.dtype, kernel)
        launch[kernel] = (bm, bn, extra)
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    pre_bm = 16 if on_cpu else 64
    _bwd_preprocess_kernel[(triton.cdiv(Nq, pre_bm), B * H)](
        out, do, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        H, Nq, D=D, D_PAD=d_pad, BLOCK_M=pre_bm,
    )
    dq = torch.empty(q.shape, dtype=_store_dtype(q), device=q.device)
    dk = torch.empty((B, Hkv, Nk, D), dtype=_store_dtype(k), device=k.device)
    dv = torch.empty((B, Hkv, Nk, D), dtype=_store_dtype(v), device=v.device)
    mask, ms, mask_bool = _mask_args(attn_mask, q, B, H, Nq, Nk)
    upcast, in_prec, p_dtype, rn_bf16 = _consts(q, allow_tf32)
    common = dict(D=D, D_PAD=d_pad, CAUSAL=is_causal, HAS_MASK=attn_mask is not None, MASK_BOOL=mask_bool,
                  UPCAST=upcast, IN_PREC=in_prec, P_DTYPE=p_dtype, RN_BF16=rn_bf16)
    bm, bn, extra = launch["dkdv"]
    _bwd_dkdv_kernel[(triton.cdiv(Nk, bn), B * Hkv)](
        q, k, v, mask, do, lse2, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *ms,
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        H, Hkv, H // Hkv, Nq, Nk, c, sm_scale, BLOCK_M=bm, BLOCK_N=bn, **common, **extra,
    )
    bm, bn, extra = launch["dq"]
    _bwd_dq_kernel[(triton.cdiv(Nq, bm), B * H)](
        q, k, v, mask, do, lse2, delta, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *ms,
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, H // Hkv, Nq, Nk, c, sm_scale, BLOCK_M=bm, BLOCK_N=bn, **common, **extra,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, sm_scale, block_m, block_n, allow_tf32):
        c = _fold_scale(sm_scale)
        out, lse2 = _forward(q, k, v, attn_mask, is_causal, c, block_m, block_n, allow_tf32)
        ctx.save_for_backward(q, k, v, out, lse2, attn_mask)
        ctx.args = (is_causal, c, sm_scale, block_m, block_n, allow_tf32)
        ctx.mark_non_differentiable(lse2)
        return out, lse2

    @staticmethod
    def backward(ctx, do, _dlse2):
        q, k, v, out, lse2, attn_mask = ctx.saved_tensors
        is_causal, c, sm_scale, block_m, block_n, allow_tf32 = ctx.args
        dq, dk, dv = _backward(do, q, k, v, out, lse2, attn_mask, is_causal, c, sm_scale,
                               block_m, block_n, allow_tf32)
        return dq, dk, dv, None, None, None, None, None, None


def _fold_scale(sm_scale: float) -> float:
    """c = fl32(scale * log2 e): the one rounding of the folded constant."""
    return float(torch.tensor(sm_scale * LOG2E, dtype=torch.float64).to(torch.float32))


def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
              return_lse=False, block_m=None, block_n=None, allow_tf32=None):
    """Scaled dot-product attention with torch's SDPA conventions.

    Args:
        q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D); fp16, bf16 or fp32 on one
            device (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        attn_mask: None, bool (True attends) or additive in q's dtype,
            broadcastable to (B, H, Nq, Nk).
        is_causal: top-left causal mask (key j visible to query i iff j <= i).
        scale: softmax scale, default 1/sqrt(D).
        enable_gqa: allow Hkv to divide H (query head h uses kv head
            h // (H // Hkv)).
        return_lse: also return the natural-log log-sum-exp per row, float32
            (B, H, Nq); -inf for fully masked rows, whose output is 0.
        block_m, block_n: tile sizes; powers of two in [16, 256] on GPU, in
            [1, 256] on the CPU interpreter; None picks `default_blocks`.
        allow_tf32: fp32 inputs only: tf32 tensor-core dots if True, IEEE
            fp32 dots if False; None follows
            ``torch.backends.cuda.matmul.allow_tf32``. The CPU interpreter
            ignores it (its dots are IEEE fp32).

    Returns ``out`` (B, H, Nq, D) in q's dtype, or ``(out, lse)``.

    >>> q = torch.randn(1, 4, 3, 16); kv = torch.randn(1, 2, 5, 16)
    >>> attention(q, kv, kv, enable_gqa=True).shape   # doctest: +SKIP
    torch.Size([1, 4, 3, 16])
    """
    args = _validate(q, k, v, attn_mask, is_causal, scale, enable_gqa, block_m, block_n, allow_tf32)
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out, lse2 = _FlashAttention.apply(q, k, v, attn_mask, args.is_causal, args.scale, block_m, block_n,
                                      allow_tf32)
    if return_lse:
        return out, lse2 * LN2
    return out


def precision_model(dtype, allow_tf32: bool = False, device: str = "cuda") -> PrecisionModel:
    """The rounding contract `attention` follows, for the emulation and bounds.

    ``device="cuda"``: ex2.approx for exp2 and truncating tensor-core
    accumulation (Fasi, Higham, Mikaitis & Pranesh, "Numerical behavior of
    NVIDIA tensor cores", PeerJ Comput. Sci. 2021). ``device="cpu"``: the
    interpreter, whose dots are fp32 IEEE (NumPy) and which ignores tf32.
    On GPU exp2 is ex2.approx.ftz.f32: results below 2**-126 flush to 0.

    exp error on the CPU: the interpreter's exp2 is NumPy's float32 exp2,
    whose accuracy is the host's (SIMD/SVML code or the C library), not
    Triton's. The model takes the documented worst case: NumPy's SVML
    (AVX-512) float32/float64 transcendentals, exp2 among them, are within
    4 ulp (numpy/numpy#19478, NumPy 1.22; its AVX2/AVX-512F float32 exp:
    2.52 ulp, numpy/numpy#13134; glibc's exp2f is listed at 1 ulp). So
    ``exp_rel_err = 4 * 2**-23 = 2**-21`` for normal results; a subnormal
    result may be off by 4 * 2**-149 absolutely, which the bounds' absolute
    exp term for ``exp_impl="exp2"`` (2**-126 per key, there for the GPU's
    flush to zero) already covers. See docs/error-bounds.md, "exp on the
    CPU path"; tests/test_triton_interpreter.py asserts this worst case.

    >>> precision_model("bf16").p
    'bf16'
    """
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, dtype)
    if name not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"unsupported dtype {dtype!r}; expected fp16, bf16 or fp32")
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool, got {type(allow_tf32).__name__}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    gpu = device == "cuda"
    return PrecisionModel(
        input=name, qk_acc="fp32", logits="fp32", exp="fp32",
        p=name,  # fp32 inputs keep P in fp32 (rounded to tf32 by the dot when tf32 is on)
        pv_acc="fp32", l_acc="fp32", rescale="fp32", out=name,
        tf32=bool(allow_tf32 and gpu and name == "fp32"),
        exp_impl="exp2",
        exp_rel_err=EX2_APPROX_REL_ERR if gpu else INTERP_EXP2_REL_ERR,
        acc_rounding="zero" if gpu else "nearest",
        gqa_sum="acc",  # the dK/dV kernel accumulates a group's query heads in fp32
        name=f"triton-flash-{name}{'-tf32' if allow_tf32 and gpu and name == 'fp32' else ''}-{device}",
    )
