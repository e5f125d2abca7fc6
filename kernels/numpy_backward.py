"""The FlashAttention-2 backward pass in plain NumPy, with every intermediate
rounded as a `PrecisionModel` says.

It is the backward of `flashcheck.kernels.triton_flash` written out step by step
(Dao 2023, "FlashAttention-2", Algorithm 2): P is not stored but
recomputed from the logits and the log-sum-exp saved by the forward pass.
``model=None`` is exact float64 arithmetic, the reference the tests compare
with torch autograd and the oracle.

Emulation contract
------------------
Same conventions as `flashcheck.kernels.numpy_attention` (values are float64 arrays
holding numbers of the named format; ``fl_X`` rounds to nearest-even unless
said otherwise; products of two dot-product inputs are exact and each
addition to an accumulator is rounded, in ``model.acc_rounding``):

1. Logits are recomputed exactly as the forward emulation computes them
   (`numpy_attention._tile_logits`: the same S = Q K^T in ``model.qk_acc``,
   the same scale constant, masks and causality).
2. The saved LSE is the forward's natural-log LSE (what ``tiled_attention``
   and the Triton kernel's ``return_lse`` give, fp32). exp2 models work in
   base 2: LSE2 = fl32(LSE * fl32(log2 e)) and
   P = fl_exp(exp2(fl_logits(t - LSE2))); exact-exp models use
   P = fl_exp(exp(fl_logits(s - LSE))). A fully masked row (LSE = -inf) uses
   0 instead, and its P is 0 since all its logits are -inf.
3. D_i = sum_c fl32(dO_ic * O_ic), summed over c in order in fp32 (round to
   nearest: ``tl.sum`` is not a tensor-core op). O is the stored forward
   output (values of ``model.out``), dO the output gradient.
4. dV_j += fl_p(P_ij)^T dO_i, dP_ij = dO_i . V_j (in ``model.qk_acc``).
5. dS_ij = fl_p(fl32(P_ij * fl32(dP_ij - D_i))): P here is the unrounded
   exp result, and dS is rounded to P's format (``model.p``: the input dtype
   for ``fa2``, fp32 for ``upcast`` and fp32 models), as the kernel does.
6. dK_j += dS_ij Q_i and dQ_i += dS_ij K_j, then each is multiplied once by
   fl32(scale) in fp32. dV, dK, dQ accumulate in ``model.pv_acc``; sums run
   over the reduction index in increasing order (for dK, dV: the query heads
   of a GQA group one after the other, then the queries).
7. With ``model.tf32`` every dot-product operand (Q, K, V, dO, P, dS) is
   first rounded to tf32.
8. dQ, dK, dV are rounded to ``model.input`` (shapes of q, k, v: dk and dv
   are summed over each GQA group). ``block_m`` and ``block_n`` are
   validated but change no number: every accumulation above is sequential
   per element, so tiles only decide which work a program does.

A ``softmax="stored"`` model (torch's math backend: plain autograd of its
forward graph, checked bit for bit against torch 2.13 on the CPU) replaces
1-8 with:

M1. P is the forward's stored P, recomputed here exactly as
    `numpy_attention.tiled_attention` forms it (q_c = fl32(q c), k_c =
    fl32(k c), c = fl32(sqrt(scale)); same logits, same softmax), so
    ``out`` and ``lse`` are not read (they may be None).
M2. dV_h = P^T dO per query head, dP = dO V^T, both fp32 GEMMs accumulated
    as in the forward (``pv_acc`` and ``qk_acc``, reduction index in order).
M3. Delta_i = sum_j fl32(dP_ij P_ij), the products rounded and added in key
    order in fp32 (ATen's softmax backward: products, then a sum).
M4. dS_ij = fl32(P_ij fl32(dP_ij - Delta_i)) (ATen's CPU order; its CUDA
    kernels form fl32(fl32(P dP) - P Delta), which the bound covers too).
M5. dq_c = dS k_c, dk_c,h = dS_h^T q_c per query head (``pv_acc``), then
    dq = fl32(dq_c c), dk_h = fl32(dk_c,h c): the chain rule through the
    products with c.
M6. dk and dv are summed over each GQA group in fp32, head after head (the
    sum of the expanded kv heads' gradients, before any cast: measured),
    then dq, dk, dv rounded to ``model.input``.

>>> import numpy as np
>>> q = k = np.zeros((1, 1, 2, 2)); v = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
>>> do = np.ones((1, 1, 2, 2)); out = np.full((1, 1, 2, 2), 0.5)
>>> lse = np.full((1, 1, 2), np.log(2.0))
>>> dq, dk, dv = attention_backward(q, k, v, out, lse, do)
>>> dv[0, 0].tolist()  # each key has weight 1/2 in both rows
[[1.0, 1.0], [1.0, 1.0]]
"""

from __future__ import annotations

import math

import numpy as np

from flashcheck.kernels.numpy_attention import (
    _as_exact,
    _base2,
    _check_block,
    _const,
    _fl,
    _fl_acc,
    _prepare,
    _stored_probs,
    _tile_logits,
)
from flashcheck.kernels.precision import round_to, to_float64
from flashcheck.kernels.sdpa_args import check_array, check_float_dtype

__all__ = ["attention_backward"]

_LOG2E = math.log2(math.e)


def _dot_operand(x, model):
    """A dot-product operand as the tensor core reads it (tf32 if asked)."""
    if model is not None and model.tf32:
        return round_to(x, "tf32")
    return x


def _check_saved(out, lse, do, q_shape, dv, model):
    """Exact float64 values of the saved forward output, LSE and dO."""
    B, H, Nq, _ = q_shape
    o, _ = _as_exact(out, "out", model, field="out")
    d, _ = _as_exact(do, "do", model, field="input")
    for name, arr in (("out", o), ("do", d)):
        if arr.shape != (B, H, Nq, dv):
            raise ValueError(f"{name} must have the output's shape (B, H, Nq, Dv) = {(B, H, Nq, dv)}, "
                             f"got {arr.shape}")
    check_array(lse, "lse")
    check_float_dtype(lse, "lse")
    l64 = to_float64(lse)
    if l64.shape != (B, H, Nq):
        raise ValueError(f"lse must have shape (B, H, Nq) = {(B, H, Nq)}, got {l64.shape}")
    if np.isnan(l64).any() or (l64 == np.inf).any():
        raise ValueError("lse contains NaN or +inf; only finite values and -inf (fully masked rows) are allowed")
    if model is not None and not np.array_equal(round_to(l64, "fp32"), l64):
        raise ValueError("lse has values not representable in fp32, the format kernels save it in")
    return o, l64, d


def _lse_units(lse, model):
    """The saved LSE in the units the exp works in (base 2 for exp2)."""
    lse = np.where(lse == -np.inf, 0.0, lse)  # fully masked rows: all their logits are -inf
    if _base2(model):
        return _fl(lse * _const(_LOG2E, model), model, "fp32")
    return lse


def _recompute_p(t, lse_units, model):
    """P from the logits (model units) and the saved LSE, rounded to exp."""
    x = _fl(t - lse_units[..., None], model, "logits")
    with np.errstate(over="ignore"):
        e = np.exp2(x) if _base2(model) else np.exp(x)
    return _fl(e, model, "exp")


def _delta(do, out, model):
    """D_i = rowsum(dO * O) in fp32, summed in order."""
    if model is None:
        return np.sum(do * out, axis=-1)
    acc = np.zeros(do.shape[:-1])
    for c in range(do.shape[-1]):
        acc = round_to(acc + round_to(do[..., c] * out[..., c], "fp32"), "fp32")
    return acc


def _ds(p, dp, delta, model):
    """dS = fl_p(fl32(P * fl32(dP - D))), rounded to P's format."""
    if model is None:
        return p * (dp - delta[..., None])
    x = round_to(dp - delta[..., None], "fp32")
    return _fl(round_to(p * x, "fp32"), model, "p")


def _acc_over(a, b, model, field):
    """sum_r a[..., r, :, None] * b[..., r, None, :] accumulated over r in
    order, each sum rounded to ``model.<field>``: a (..., R, M), b (..., R, N)
    -> (..., M, N)."""
    if model is None:
        return np.swapaxes(a, -1, -2) @ b
    acc = np.zeros(a.shape[:-2] + (a.shape[-1], b.shape[-1]))
    for r in range(a.shape[-2]):
        acc = _fl_acc(acc + a[..., r, :, None] * b[..., r, None, :], model, field)
    return acc


def _group_rows(x, hkv):
    """(B, H, N, C) -> (B, Hkv, G * N, C): the rows of one GQA group's query
    heads one after the other, the order the dK/dV kernel visits them."""
    B, H, N, C = x.shape
    return x.reshape(B, hkv, (H // hkv) * N, C)


def attention_backward(q, k, v, out, lse, do, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                       *, block_m=64, block_n=64, model=None):
    """Gradients (dq, dk, dv) of ``scaled_dot_product_attention`` by the
    FlashAttention-2 backward pass, rounded as ``model`` says.

    q (B, H, Nq, D); k, v (B, Hkv, Nk, D / Dv); ``out`` (B, H, Nq, Dv) and
    ``lse`` (B, H, Nq, natural log) are what the forward pass saved
    (``tiled_attention(..., return_lse=True)`` under the same model, or a
    kernel's own); a ``softmax="stored"`` model (the math backend, contract
    M1-M6) reads neither, so they may be None, and checks their shapes when
    given. ``do`` (B, H, Nq, Dv) is the output gradient. Options as
    in `flashcheck.kernels.numpy_attention.tiled_attention`. Returns float64 arrays
    dq (B, H, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv); with GQA, dk and
    dv are summed over the query heads sharing a kv head.

    >>> import numpy as np
    >>> from flashcheck.kernels.numpy_attention import tiled_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = (rng.standard_normal((1, 1, 3, 2)) for _ in range(4))
    >>> out, lse = tiled_attention(q, k, v, return_lse=True)
    >>> dq, dk, dv = attention_backward(q, k, v, out, lse, do)
    >>> bool(np.allclose(dv.sum(-2), do.sum(-2)))  # each query's P sums to 1
    True
    """
    prob = _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa, model)
    _check_block(block_m, "block_m")
    _check_block(block_n, "block_n")
    # Overflow in an emulated format propagates (inf, then NaN), as on hardware.
    with np.errstate(over="ignore", invalid="ignore"):
        if model is not None and model.softmax == "stored":
            return _stored_backward(prob, k.shape[1], out, lse, do, model)
        return _backward(prob, k.shape[1], out, lse, do, model)


def _backward(prob, Hkv, out, lse, do, model):
    B, H, Nq, D = prob.q.shape
    Dv = prob.v.shape[-1]
    o, lse64, dO = _check_saved(out, lse, do, prob.q.shape, Dv, model)

    # 1-2. logits and P, recomputed from the saved LSE.
    rows, keys = np.arange(Nq), np.arange(prob.nk)
    t = _tile_logits(prob, prob.q[:, :, None], rows, keys, model)[:, :, 0]  # (B, H, Nq, Nk)
    dead = lse64 == -np.inf
    if np.isfinite(t[dead]).any():
        raise ValueError("lse is -inf on a row that has visible keys; pass the forward's own lse")
    p = _recompute_p(t, _lse_units(lse64, model), model)
    p = np.where(np.isneginf(t), 0.0, p)

    # 3. D_i from the stored output.
    delta = _delta(dO, o, model)

    # 4. dV and dP.
    do_dot = _dot_operand(dO, model)
    p_dot = _dot_operand(_fl(p, model, "p"), model)
    dv_acc = _acc_over(_group_rows(p_dot, Hkv), _group_rows(do_dot, Hkv), model, "pv_acc")
    dp = _acc_over(np.swapaxes(do_dot, -1, -2), np.swapaxes(prob.v, -1, -2), model, "qk_acc")

    # 5-6. dS, then dK and dQ, each scaled once at the end.
    ds = _dot_operand(_ds(p, dp, delta, model), model)
    dk_acc = _acc_over(_group_rows(ds, Hkv), _group_rows(prob.q, Hkv), model, "pv_acc")
    dq_acc = _acc_over(np.swapaxes(ds, -1, -2), prob.k, model, "pv_acc")
    dk_acc = _fl(dk_acc * _const(prob.scale, model), model, "fp32")
    dq_acc = _fl(dq_acc * _const(prob.scale, model), model, "fp32")

    # 8. outputs in the input dtype (dk, dv are already summed per group).
    return tuple(_fl(g, model, "input") for g in (dq_acc, dk_acc, dv_acc))


def _check_saved_shapes(out, lse, q_shape, dv):
    """Shapes of a stored-softmax backward's optional ``out`` and ``lse``."""
    B, H, Nq, _ = q_shape
    for name, x, shape in (("out", out, (B, H, Nq, dv)), ("lse", lse, (B, H, Nq))):
        if x is None:
            continue
        check_array(x, name)
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)} (or pass None: a stored-softmax "
                             f"model does not read it)")


def _group_sum(x, hkv, model):
    """(B, H, N, C) -> (B, Hkv, N, C): each GQA group's heads added in order in fp32."""
    B, H, N, C = x.shape
    g = x.reshape(B, hkv, H // hkv, N, C)
    acc = g[:, :, 0]
    for h in range(1, H // hkv):
        acc = _fl(acc + g[:, :, h], model, "fp32")
    return acc


def _stored_delta(dp, p, model):
    """Delta_i = sum_j fl32(dP_ij P_ij), added in key order in fp32 (M3)."""
    delta = np.zeros(dp.shape[:-1])
    for j in range(dp.shape[-1]):
        delta = _fl(delta + _fl(dp[..., j] * p[..., j], model, "fp32"), model, "fp32")
    return delta


def _stored_backward(prob, Hkv, out, lse, do, model):
    """The math backend's backward (contract M1-M6)."""
    Dv = prob.v.shape[-1]
    _check_saved_shapes(out, lse, prob.q.shape, Dv)
    dO, _ = _as_exact(do, "do", model, field="input")
    if dO.shape != prob.q.shape[:3] + (Dv,):
        raise ValueError(f"do must have the output's shape (B, H, Nq, Dv) = {prob.q.shape[:3] + (Dv,)}, "
                         f"got {dO.shape}")
    p = _stored_probs(prob, model)[0]  # M1
    dv_h = _acc_over(p, dO, model, "pv_acc")  # M2, per query head
    dp = _acc_over(np.swapaxes(dO, -1, -2), np.swapaxes(prob.v, -1, -2), model, "qk_acc")
    delta = _stored_delta(dp, p, model)  # M3
    ds = _fl(p * _fl(dp - delta[..., None], model, "fp32"), model, "fp32")  # M4
    c = prob.qk_const  # M5
    dq = _fl(_acc_over(np.swapaxes(ds, -1, -2), prob.k, model, "pv_acc") * c, model, "fp32")
    dk_h = _fl(_acc_over(ds, prob.q, model, "pv_acc") * c, model, "fp32")
    dk, dv = _group_sum(dk_h, Hkv, model), _group_sum(dv_h, Hkv, model)  # M6
    return tuple(_fl(g, model, "input") for g in (dq, dk, dv))
