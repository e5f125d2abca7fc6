"""Deliberately broken (and correct) attention backward passes.

The gradient counterpart of `flashcheck.verify.planted`. Every function here
takes torch's ``scaled_dot_product_attention`` arguments and returns the
output in the input dtype from a `torch.autograd.Function`, so
``torch.autograd.grad(out, (q, k, v), dO)`` runs the planted backward; they
are targets as ``flashcheck.verify.planted_backward:NAME``.

The forward is correct in every variant: float64 attention rounded once to
the input dtype, with the natural-log LSE (and the row max) saved in fp32
(-inf for a row with no visible key), so that a failing gradient is always
the backward's fault.

The backward, `_backward`, is FlashAttention-2's (Dao 2023, Algorithm 2)
written in torch with one switch per bug: an outer loop over 64-key tiles
and an inner loop over 64-query tiles; P recomputed from the saved LSE;
D_i = rowsum(dO * O) from the stored output; dS = P * (dP - D);
dV += P^T dO, dK += dS^T Q, dQ += dS K, dK and dQ scaled once at the end.
It rounds as the ``fa2`` model (fp16/bf16) and the ``fp32-ieee`` model
(fp32) say (`flashcheck.kernels.numpy_backward` states the contract), so
the correct variant stays inside `flashcheck.verify.grad_bounds.gradient_bound`:
fp32 state, P and dS rounded to the input dtype before their products, exp
evaluated in float64 and rounded (torch's fp32 exp is only faithful).
float64 inputs run every step in float64 (for ``gradcheck``).

Bugs in `MULTI_TILE_BACKWARD` change nothing while a case fits one query
tile and one key tile (Nq <= 64 and Nk <= 64).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from flashcheck.kernels.sdpa_args import check_sdpa_args

__all__ = ["BLOCK_M", "BLOCK_N", "BROKEN_BACKWARD", "CORRECT_BACKWARD", "MULTI_TILE_BACKWARD"]

BLOCK_M = 64  # queries per query tile
BLOCK_N = 64  # keys per key tile

_LOG2E = math.log2(math.e)


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _exp(x: torch.Tensor, base2: bool = False) -> torch.Tensor:
    """exp (or exp2) in float64, rounded once to x's dtype."""
    y = x.double()
    return (torch.exp2(y) if base2 else torch.exp(y)).to(x.dtype)


def _rounded(x: torch.Tensor, dtype) -> torch.Tensor:
    """x rounded to ``dtype`` and held in x's dtype again."""
    return x.to(dtype).to(x.dtype)


def _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Validated arguments (torch's rules), or NotImplementedError for what
    is not modelled."""
    args = check_sdpa_args(query, key, value, attn_mask, is_causal, scale, enable_gqa,
                           formats=("fp16", "bf16", "fp32", "fp64"), positive_scale=False)
    if dropout_p:
        raise NotImplementedError("dropout is not modelled")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not bool(torch.isfinite(t).all()):
            raise NotImplementedError(f"{name} has NaN or Inf: the gradients of non-finite inputs are not judged")
    return args


class _Planes:
    """The case's visibility as tile slices: the mask (bool, or additive in
    the state dtype, broadcast views) and causality, top-left aligned as in
    SDPA (``shift`` = Nk - Nq gives the bottom-right alignment)."""

    def __init__(self, attn_mask, is_causal, target, acc, shift=0, device="cpu"):
        self.vis = self.bias = None
        self.device = device
        if attn_mask is not None:
            mask = attn_mask.detach().to(device)
            if mask.dtype == torch.bool:
                self.vis = mask.expand(target)
            else:
                self.bias = mask.to(acc).expand(target)
        self.is_causal, self.shift = is_causal, shift

    def hidden_tile(self, q0, q1, k0) -> bool:
        """Whether causality hides the whole tile (the kernel's loop skips it)."""
        return self.is_causal and k0 > q1 - 1 + self.shift

    def apply(self, s, q0, q1, k0, k1):
        if self.bias is not None:
            s = s + self.bias[:, :, q0:q1, k0:k1]
        if self.vis is not None:
            s = torch.where(self.vis[:, :, q0:q1, k0:k1], s, -math.inf)
        if self.is_causal:
            j, i = torch.arange(k0, k1, device=self.device), torch.arange(q0, q1, device=self.device)
            hidden = j[None, :] > i[:, None] + self.shift
            s = torch.where(hidden, -math.inf, s)
        return s


def _forward(q, k, v, attn_mask, is_causal, scale, groups):
    """Output (input dtype), LSE and row max (state dtype) of float64 attention."""
    acc = _state_dtype(q.dtype)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    heads = torch.arange(H) // groups
    q64, k64, v64 = q.double(), k.double()[:, heads], v.double()[:, heads]
    planes = _Planes(attn_mask, is_causal, (B, H, Nq, Nk), torch.float64)
    s = planes.apply((q64 @ k64.transpose(-1, -2)) * scale, 0, Nq, 0, Nk)
    m = s.amax(-1)
    dead = torch.isneginf(m)  # rows with no visible key
    e = torch.exp(s - torch.where(dead, 0.0, m)[..., None])
    l_sum = e.sum(-1)
    out = (e @ v64) / torch.where(dead, 1.0, l_sum)[..., None]  # dead rows: 0 / 1
    lse = torch.where(dead, -math.inf, m + torch.log(l_sum))
    return out.to(q.dtype), lse.to(acc), m.to(acc)


def _backward(q, k, v, attn_mask, is_causal, scale, out, lse, m, do, bug):
    """(dq, dk, dv) in the input dtype by the tiled FlashAttention-2 backward."""
    dtype = q.dtype
    acc = _state_dtype(dtype)
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = H // Hkv
    heads = torch.arange(H) // groups
    qf, kf, vf = q.to(acc), k.to(acc)[:, heads], v.to(acc)[:, heads]
    dof, of = do.to(acc), out.to(acc)

    if bug == "backward_ignores_scale":
        scale = 1.0 / math.sqrt(D)
    c = torch.tensor(scale, dtype=acc)  # the kernel's constant, fl32(scale)
    if bug == "delta_missing":
        delta = torch.zeros((B, H, Nq), dtype=acc)
    elif bug == "delta_from_do":
        delta = (dof * dof).sum(-1)
    else:
        delta = (dof * of).sum(-1)
    # Rows with no visible key saved LSE = -inf; exp(s - 0) is then 0 on all their (-inf) logits.
    lse_used = lse if bug == "fully_masked_nan" else torch.where(torch.isneginf(lse), 0.0, lse)
    m_safe = torch.where(torch.isneginf(m), 0.0, m)
    planes = _Planes(None if bug == "mask_ignored" else attn_mask,
                     is_causal and bug != "causal_ignored", (B, H, Nq, Nk), acc,
                     shift=Nk - Nq if bug == "causal_bottom_right" else 0)
    log2e = torch.tensor(_LOG2E, dtype=acc)

    dq = torch.zeros((B, H, Nq, D), dtype=acc)
    dk = torch.zeros((B, H, Nk, D), dtype=acc)
    dv = torch.zeros((B, H, Nk, Dv), dtype=acc)
    n_key_tiles = max(1, Nk // BLOCK_N) if bug == "kv_tiles_floor" else -(-Nk // BLOCK_N)
    for k0 in range(0, n_key_tiles * BLOCK_N, BLOCK_N):
        k1 = min(k0 + BLOCK_N, Nk)
        kt, vt = kf[:, :, k0:k1], vf[:, :, k0:k1]
        dk_t = torch.zeros((B, H, k1 - k0, D), dtype=acc)
        dv_t = torch.zeros((B, H, k1 - k0, Dv), dtype=acc)
        folded = False  # whether dk_t, dv_t hold an earlier query tile's sum
        for q0 in range(0, Nq, BLOCK_M):
            q1 = min(q0 + BLOCK_M, Nq)
            if planes.hidden_tile(q0, q1, k0):
                continue
            qt, dot, lse_t = qf[:, :, q0:q1], dof[:, :, q0:q1], lse_used[:, :, q0:q1, None]
            s = planes.apply((qt @ kt.transpose(-1, -2)) * c, q0, q1, k0, k1)
            if bug == "lse_base_mismatch":
                p = _exp(s * log2e - lse_t, base2=True)  # base-2 logits minus a natural-log LSE
            else:
                p = _exp(s - lse_t)
            p_dv = _exp(s - m_safe[:, :, q0:q1, None]) if bug == "dv_unnormalised_p" else p
            dp = dot @ vt.transpose(-1, -2)
            ds = _rounded(p * (dp - delta[:, :, q0:q1, None]), dtype)
            contribution = ds @ kt
            if bug == "dq_overwritten":
                dq[:, :, q0:q1] = contribution  # a store where an atomic add belongs
            else:
                dq[:, :, q0:q1] += contribution
            if bug == "ragged_query_tile_skipped" and q0 > 0 and q1 - q0 < BLOCK_M:
                continue  # the dK/dV loop runs over Nq // 64 query tiles
            if bug == "dkdv_bf16_accumulator" and folded:
                dk_t, dv_t = _rounded(dk_t, torch.bfloat16), _rounded(dv_t, torch.bfloat16)
            dv_t += _rounded(p_dv, dtype).transpose(-1, -2) @ dot
            dk_t += ds.transpose(-1, -2) @ qt
            folded = True
        dk[:, :, k0:k1], dv[:, :, k0:k1] = dk_t, dv_t

    # GQA: each kv head's gradient is the sum over its group of query heads.
    dk, dv = (g.reshape(B, Hkv, groups, Nk, g.shape[-1]) for g in (dk, dv))
    if bug == "gqa_dkdv_last_head":
        dk, dv = dk[:, :, -1], dv[:, :, -1]  # each query head stores; the group's last one wins
    else:
        dk, dv = dk.sum(2), dv.sum(2)
    if bug != "dk_missing_scale":
        dk = dk * c
    dq = dq * c
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale, groups, bug):
        device = query.device
        q, k, v = (t.detach().to("cpu") for t in (query, key, value))
        out, lse, m = _forward(q, k, v, attn_mask, is_causal, scale, groups)
        ctx.save_for_backward(q, k, v, out, lse, m)
        ctx.options = (attn_mask, is_causal, scale, bug, device)
        return out.to(device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, m = ctx.saved_tensors
        attn_mask, is_causal, scale, bug, device = ctx.options
        grads = _backward(q, k, v, attn_mask, is_causal, scale, out, lse, m, grad_out.detach().to("cpu"), bug)
        return (*(g.to(device) for g in grads), None, None, None, None, None)


def _make(bug):
    def impl(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        args = _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return _Attention.apply(query, key, value, attn_mask, args.is_causal, args.scale, args.groups, bug)

    impl.__name__ = bug or "correct_tiled"
    impl.__doc__ = (f"Correct forward; tiled FlashAttention-2 backward with the planted bug {bug!r}." if bug
                    else "Correct forward and tiled FlashAttention-2 backward.")
    return impl


def correct_float64(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """Correct: attention in float64 torch ops, differentiated by autograd;
    output and gradients rounded once to the input dtype."""
    args = _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    B, H, Nq, _ = query.shape
    Nk = key.shape[2]
    heads = torch.arange(H, device=query.device) // args.groups
    q, k, v = query.double(), key.double()[:, heads], value.double()[:, heads]
    mask = attn_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    planes = _Planes(mask, args.is_causal, (B, H, Nq, Nk), torch.float64, device=query.device)
    s = planes.apply((q @ k.transpose(-1, -2)) * args.scale, 0, Nq, 0, Nk)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    # softmax of an all -inf row is NaN in value and gradient: give it finite logits, then zero it.
    p = torch.softmax(torch.where(dead, 0.0, s), -1) * ~dead
    return (p @ v).to(query.dtype)


#: bug name -> what it does wrong
BROKEN_BACKWARD = {
    "delta_missing": "dS = P * dP: the D_i = rowsum(dO * O) term is left out",
    "delta_from_do": "D_i is computed as rowsum(dO * dO) instead of rowsum(dO * O)",
    "dv_unnormalised_p": "dV uses exp(s - m), P before division by the row sum (the row max saved, not the LSE)",
    "backward_ignores_scale": "the backward ignores the scale argument (1/sqrt(D) in the P recompute and for "
                              "dQ, dK); the forward honours it",
    "lse_base_mismatch": "P recomputed as exp2(s log2 e - LSE) with the natural-log LSE (base mismatch)",
    "causal_ignored": "the causal mask is not applied when P is recomputed",
    "causal_bottom_right": "the backward's causal mask is bottom-right aligned; the forward's (as SDPA's) is "
                           "top-left",
    "mask_ignored": "attn_mask (bool or additive) is not applied when P is recomputed",
    "fully_masked_nan": "rows with no visible key recompute exp(s - LSE) with LSE = -inf: NaN gradients",
    "gqa_dkdv_last_head": "GQA dK, dV are not summed over the group: the last query head's store wins",
    "dk_missing_scale": "dK is not multiplied by the scale at the end",
    "kv_tiles_floor": "the key-tile loop runs Nk // 64 times: past one tile the ragged last key tile is dropped "
                      "(its dK, dV stay 0, dQ misses it)",
    "ragged_query_tile_skipped": "the dK/dV loop runs over Nq // 64 query tiles: a ragged last query tile after "
                                 "the first adds nothing to dK, dV",
    "dkdv_bf16_accumulator": "the dK, dV accumulators are held in bf16 between query tiles",
    "dq_overwritten": "dQ is stored, not accumulated, per key tile: the last key tile visited wins",
}

#: Bugs that change nothing while Nq <= 64 and Nk <= 64.
MULTI_TILE_BACKWARD = ("kv_tiles_floor", "ragged_query_tile_skipped", "dkdv_bf16_accumulator", "dq_overwritten")

CORRECT_BACKWARD = ("correct_tiled", "correct_float64")

correct_tiled = _make(None)
for _bug in BROKEN_BACKWARD:
    globals()[_bug] = _make(_bug)
