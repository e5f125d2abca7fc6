"""Deliberately broken (and correct) attention implementations.

The harness tests itself on these: each broken one carries one classic
flash-attention bug, and a campaign must flag every one of them while
passing the correct ones. All take torch's ``scaled_dot_product_attention``
arguments and return a tensor in the input dtype, so they are targets as
``flashcheck.verify.planted:NAME``.

They share one tiled forward pass, `_flash`, written the FlashAttention-2
way (running max m, running sum l, unnormalised accumulator, fp32 state,
P in the input dtype for the P V product) with one switch per bug. exp is
evaluated in float64 and rounded to fp32 so that the correct variants follow
the ``fa2``/``fp32-ieee`` models exactly (torch's own fp32 exp is only
faithful to about one ulp).
"""

from __future__ import annotations

import math

import torch

__all__ = ["BROKEN", "CORRECT"]

_BLOCK = 16


def _exp32(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.double()).float()


def _expand_kv(k, v, H, bug):
    Hkv = k.shape[1]
    if Hkv == H:
        return k, v
    group = H // Hkv
    if bug == "gqa_head_mapping":
        idx = torch.arange(H) % Hkv  # interleaved instead of grouped
    else:
        idx = torch.arange(H) // group
    return k[:, idx], v[:, idx]


def _visible(Nq, Nk, attn_mask, is_causal, bug, dtype, B, H):
    """Boolean (B, H, Nq, Nk) visibility and additive float bias."""
    vis = torch.ones((B, H, Nq, Nk), dtype=torch.bool)
    bias = torch.zeros((B, H, Nq, Nk), dtype=torch.float32)
    if is_causal:
        i = torch.arange(Nq)[:, None]
        j = torch.arange(Nk)[None, :]
        if bug == "wrong_mask":
            vis = vis & (j < i)  # off by one: a query no longer sees itself
        else:
            vis = vis & (j <= i)
    if attn_mask is not None:
        mask = attn_mask.to("cpu")
        if mask.dtype == torch.bool:
            if bug == "wrong_mask":
                mask = ~mask  # inverted convention: True taken as "masked"
            vis = vis & mask.expand(B, H, Nq, Nk)
        else:
            bias = bias + mask.float().expand(B, H, Nq, Nk)
    return vis, bias


def _overread(t: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of ``width`` elements read from the flat row-major storage of
    ``t`` starting at each row's start (zeros past the end)."""
    *lead, D = t.shape
    flat = torch.cat([t.reshape(-1), torch.zeros(width)])
    starts = torch.arange(t.numel() // D) * D
    rows = flat[starts[:, None] + torch.arange(width)[None, :]]
    return rows.reshape(*lead, width)


def _flash(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *, bug=None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must have rank 4 (B, H, N, D)")
    dtype, device = q.dtype, q.device
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if bug == "batch_stride":
        # Reads the storage as if the tensors were contiguous.
        q, k, v = (torch.as_strided(t, t.shape, t.contiguous().stride(), t.storage_offset()) for t in (q, k, v))
    q, k, v = (t.detach().to("cpu").float() for t in (q, k, v))
    k, v = _expand_kv(k, v, H, bug)
    if scale is None or bug == "ignored_scale":
        scale = 1.0 / math.sqrt(D)
    if bug == "head_dim_padding" and D & (D - 1):
        # Unmasked loads of a power-of-two head dim run into the next row's data.
        q, k = _overread(q, 1 << D.bit_length()), _overread(k, 1 << D.bit_length())
    vis, bias = _visible(Nq, Nk, attn_mask, is_causal, bug, dtype, B, H)

    m = torch.full((B, H, Nq), 0.0 if bug == "wrong_init" else -math.inf)
    l_sum = torch.zeros((B, H, Nq))
    acc = torch.zeros((B, H, Nq, v.shape[-1]))
    for start in range(0, Nk, _BLOCK):
        stop = start + _BLOCK
        kt, vt = k[:, :, start:stop], v[:, :, start:stop]
        vis_t, bias_t = vis[..., start:stop], bias[..., start:stop]
        if bug == "unmasked_ragged_tail" and kt.shape[2] < _BLOCK:
            # The last tile is padded with zero keys that are not masked out.
            pad = _BLOCK - kt.shape[2]
            kt = torch.cat([kt, torch.zeros(B, H, pad, kt.shape[-1])], 2)
            vt = torch.cat([vt, torch.zeros(B, H, pad, vt.shape[-1])], 2)
            vis_t = torch.cat([vis_t, torch.ones(B, H, Nq, pad, dtype=torch.bool)], -1)
            bias_t = torch.cat([bias_t, torch.zeros(B, H, Nq, pad)], -1)
        s = (q @ kt.transpose(-1, -2)).float() * scale + bias_t
        if bug == "low_precision_logits":
            s = s.to(dtype).float()
        s = torch.where(vis_t, s, -math.inf)
        if bug == "no_max_subtraction":
            m_new = torch.zeros_like(m)
        else:
            m_new = torch.maximum(m, s.max(-1).values)
        safe = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        if bug == "missing_rescale":
            alpha = torch.ones_like(m)
        elif bug == "wrong_rescale":
            alpha = torch.where(torch.isfinite(m), _exp32(m_new - m), 0.0)  # sign flipped
        else:
            alpha = _exp32(m - safe)
        p = _exp32(s - safe[..., None])
        l_sum = l_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p.to(dtype).float() @ vt
        if bug == "low_precision_accumulator":
            acc = acc.to(torch.bfloat16).float()
        m = m_new
    if bug == "fully_masked_rows":
        out = acc / l_sum[..., None]  # 0/0 = NaN on rows with no visible key
    else:
        out = torch.where(l_sum[..., None] > 0, acc / l_sum.clamp_min(1e-45)[..., None], 0.0)
    return out.to(dtype).to(device)


def _make(bug):
    def impl(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p:
            raise NotImplementedError("dropout is not modelled")
        return _flash(query, key, value, attn_mask, is_causal, scale, enable_gqa, bug=bug)

    impl.__name__ = bug or "correct"
    impl.__doc__ = f"Tiled flash attention with the planted bug {bug!r}." if bug else "Correct tiled flash attention."
    return impl


def correct_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False):
    """Correct: float64 attention rounded once to the input dtype."""
    if dropout_p:
        raise NotImplementedError("dropout is not modelled")
    from flashcheck.verify.oracle import attention as oracle

    res = oracle(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return torch.from_numpy(res.out).to(query.dtype).to(query.device)


#: bug name -> what it does wrong
BROKEN = {
    "no_max_subtraction": "exp(s) without subtracting the running max: overflows for large logits",
    "wrong_init": "running max starts at 0 instead of -inf: very negative rows underflow to 0/0",
    "unmasked_ragged_tail": "the last, partial key tile includes zero-padded keys",
    "missing_rescale": "the accumulator is not rescaled when the running max grows",
    "wrong_rescale": "the rescale factor is exp(m_new - m_old) instead of exp(m_old - m_new)",
    "low_precision_accumulator": "the P V accumulator is rounded to bf16 between tiles",
    "wrong_mask": "causal mask off by one (j < i) and boolean masks inverted",
    "ignored_scale": "the scale argument is ignored (always 1/sqrt(D))",
    "gqa_head_mapping": "query head h uses kv head h % Hkv instead of h // (H / Hkv)",
    "batch_stride": "inputs are read as if contiguous, ignoring their strides",
    "fully_masked_rows": "rows with no visible key give 0/0 = NaN",
    "head_dim_padding": "head dims that are not powers of two are loaded unmasked up to the next power of two",
    "low_precision_logits": "logits are rounded to the input dtype before exp",
}

CORRECT = ("correct_tiled", "correct_reference")

correct_tiled = _make(None)
for _bug in BROKEN:
    globals()[_bug] = _make(_bug)


# -- targets that misbehave as programs, for the campaign's robustness ------------

def hangs(query, key, value, **kwargs):
    """Never returns."""
    import time

    while True:
        time.sleep(1)


def segfaults(query, key, value, **kwargs):
    """Kills its own process the way a bad memory access does."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def wrong_shape(query, key, value, **kwargs):
    """Drops the last query row."""
    return correct_tiled(query, key, value, **kwargs)[:, :, :-1]


def wrong_dtype(query, key, value, **kwargs):
    """Returns fp32 whatever the input dtype."""
    return correct_tiled(query, key, value, **kwargs).float() if query.dtype != torch.float32 else \
        correct_tiled(query, key, value, **kwargs).double()


def raises(query, key, value, **kwargs):
    """Fails with an ordinary exception."""
    raise RuntimeError("planted failure")


MISBEHAVING = ("hangs", "segfaults", "wrong_shape", "wrong_dtype", "raises")
