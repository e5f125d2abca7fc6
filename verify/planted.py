"""Deliberately broken (and correct) attention implementations.

The harness tests itself on these: each broken one carries one classic
flash-attention bug, and a campaign must flag every one of them while
passing the correct ones. All take torch's ``scaled_dot_product_attention``
arguments and return a tensor in the input dtype, so they are targets as
``flashcheck.verify.planted:NAME``.

They share one tiled forward pass, `_flash`, written the FlashAttention-2
way (64 x 64 tiles of queries and keys, running max m, running sum l,
unnormalised accumulator, fp32 state, P in the input dtype for the P V
product) with one switch per bug. exp is evaluated in float64 and rounded
to fp32 so that the correct variants follow the ``fa2``/``fp32-ieee`` models
exactly (torch's own fp32 exp is only faithful to about one ulp).

Some bugs live only past the first tile (`MULTI_TILE`): they change nothing
while a case fits one query tile and two key tiles, as in real kernels whose
index arithmetic or merges are wrong only for later tiles.

The narrow kernels (`NARROW`) support a slice of SDPA, the way most real
kernels do, and raise `NotImplementedError` elsewhere.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BLOCK_M", "BLOCK_N", "BROKEN", "CORRECT", "FAULTING", "FAULT_ALIGN", "MISBEHAVING", "MULTI_TILE",
           "NARROW", "reset_simulated_faults"]

BLOCK_M = 64  # queries per query tile
BLOCK_N = 64  # keys per key tile


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


def _visible(Nq, Nk, attn_mask, bug, B, H):
    """Boolean (B, H, Nq, Nk) visibility of ``attn_mask`` and its additive float bias."""
    vis = torch.ones((B, H, Nq, Nk), dtype=torch.bool)
    bias = torch.zeros((B, H, Nq, Nk), dtype=torch.float32)
    # is_causal is applied per query tile, in _flash (wrong_mask: j < i, off by one).
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
    vis, bias = _visible(Nq, Nk, attn_mask, bug, B, H)

    out = torch.empty((B, H, Nq, v.shape[-1]))
    j = torch.arange(Nk)[None, :]
    for q0 in range(0, Nq, BLOCK_M):
        q1 = min(q0 + BLOCK_M, Nq)
        rows = torch.arange(q0, q1)
        if bug == "last_query_tile_shifted" and q0 > 0 and q1 - q0 < BLOCK_M:
            # A clamped full-tile load (the last 64 rows); its first rows are stored at this tile's rows.
            rows = torch.arange(Nq - BLOCK_M, Nq - BLOCK_M + (q1 - q0))
        vis_q, bias_q = vis[:, :, rows], bias[:, :, rows]
        if is_causal:
            i = rows - q0 if bug == "causal_tile_local_row" else rows  # the row index within the tile
            vis_q = vis_q & ((j < i[:, None]) if bug == "wrong_mask" else (j <= i[:, None]))
        if bug == "fully_masked_unmasked":
            vis_q = vis_q | ~vis_q.any(-1, keepdim=True)  # a row that sees nothing sees everything
        out[:, :, q0:q1] = _key_loop(q[:, :, rows], k, v, vis_q, bias_q, scale, dtype, bug)
    return out.to(dtype).to(device)


def _key_loop(q, k, v, vis, bias, scale, dtype, bug):
    """Attention of one query tile over every key tile (split in two halves
    that are merged, for Nk > 2 tiles, as split-KV kernels do)."""
    Nk = k.shape[2]
    if Nk > 2 * BLOCK_N:
        half = -(-(Nk // 2) // BLOCK_N) * BLOCK_N  # a split on a tile boundary
        first = _partial(q, k[:, :, :half], v[:, :, :half], vis[..., :half], bias[..., :half], scale, dtype, bug)
        second = _partial(q, k[:, :, half:], v[:, :, half:], vis[..., half:], bias[..., half:], scale, dtype, bug)
        m, l_sum, acc = _merge(first, second, bug)
    else:
        m, l_sum, acc = _partial(q, k, v, vis, bias, scale, dtype, bug)
    if bug == "fully_masked_rows":
        return acc / l_sum[..., None]  # 0/0 = NaN on rows with no visible key
    # l == 0: no visible key, output 0. A NaN l (a NaN logit) must stay NaN, so no "l > 0" test.
    return torch.where(l_sum[..., None] == 0, 0.0, acc / l_sum[..., None])


def _merge(a, b, bug):
    """Merge two partial states (m, l, acc) over disjoint key ranges."""
    (m1, l1, acc1), (m2, l2, acc2) = a, b
    if bug == "split_kv_merge_unscaled":
        return torch.maximum(m1, m2), l1 + l2, acc1 + acc2  # each half still relative to its own max
    m = torch.maximum(m1, m2)
    safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w1, w2 = _exp32(m1 - safe), _exp32(m2 - safe)
    return m, l1 * w1 + l2 * w2, acc1 * w1[..., None] + acc2 * w2[..., None]


def _partial(q, k, v, vis, bias, scale, dtype, bug):
    """The online-softmax state (m, l, acc) of q over keys k, v, tile by tile."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    m = torch.full((B, H, Nq), 0.0 if bug == "wrong_init" else -math.inf)
    l_sum = torch.zeros((B, H, Nq))
    acc = torch.zeros((B, H, Nq, v.shape[-1]))
    n_tiles = max(1, Nk // BLOCK_N) if bug == "kv_tiles_floor" else -(-Nk // BLOCK_N)
    for start in range(0, n_tiles * BLOCK_N, BLOCK_N):
        stop = start + BLOCK_N
        kt, vt = k[:, :, start:stop], v[:, :, start:stop]
        vis_t, bias_t = vis[..., start:stop], bias[..., start:stop]
        if bug == "unmasked_ragged_tail" and kt.shape[2] < BLOCK_N:
            # The last tile is padded with zero keys that are not masked out.
            pad = BLOCK_N - kt.shape[2]
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
    return m, l_sum, acc


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
    if not all(bool(torch.isfinite(t).all()) for t in (query, key, value)):
        raise NotImplementedError("the float64 reference takes finite inputs only")
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
    "fully_masked_unmasked": "rows with no visible key (bool mask or causal) attend to every key, as cuDNN SDPA "
                             "was measured to do",
    "head_dim_padding": "head dims that are not powers of two are loaded unmasked up to the next power of two",
    "low_precision_logits": "logits are rounded to the input dtype before exp",
    "causal_tile_local_row": "the causal mask of query tiles after the first uses the row index within the tile",
    "kv_tiles_floor": "the key-tile count is Nk // 64 (floor): past one tile, the ragged last key tile is dropped",
    "split_kv_merge_unscaled": "split-KV halves (Nk > 128) are merged without rescaling to the common max",
    "last_query_tile_shifted": "a ragged last query tile (after the first) loads the last 64 rows, clamped, "
                               "and stores them at its own rows",
}

#: Bugs that change nothing while a case fits one query tile and two key tiles.
MULTI_TILE = ("causal_tile_local_row", "kv_tiles_floor", "split_kv_merge_unscaled", "last_query_tile_shifted")

CORRECT = ("correct_tiled", "correct_reference")

correct_tiled = _make(None)
for _bug in BROKEN:
    globals()[_bug] = _make(_bug)


# -- narrow kernels: a slice of SDPA, NotImplementedError elsewhere ---------------

def _narrow_checks(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise NotImplementedError(f"only fp16 and bf16, got {query.dtype}")
    if query.shape[-1] not in (64, 128) or value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"head dim must be 64 or 128 for q, k and v, got {query.shape[-1]}, "
                                  f"{value.shape[-1]}")
    if attn_mask is not None:
        raise NotImplementedError("no attn_mask (only is_causal)")
    if enable_gqa or key.shape[1] != query.shape[1]:
        raise NotImplementedError("no GQA/MQA")
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError(f"Nq must equal Nk, got {query.shape[2]} and {key.shape[2]}")
    if not all(t.is_contiguous() for t in (query, key, value)):
        raise NotImplementedError("contiguous inputs only")
    if dropout_p:
        raise NotImplementedError("dropout is not modelled")


def _make_narrow(bug):
    def impl(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        _narrow_checks(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        return _flash(query, key, value, None, is_causal, scale, False, bug=bug)

    impl.__name__ = "narrow_buggy" if bug else "narrow_correct"
    impl.__doc__ = ("fp16/bf16, head dim 64 or 128, no mask but causal, MHA, Nq == Nk, contiguous; "
                    + (f"planted bug {bug!r}." if bug else "correct."))
    return impl


def declines_everything(query, key, value, **kwargs):
    """Raises NotImplementedError for every case."""
    raise NotImplementedError("this kernel supports nothing the harness can build")


#: Narrow kernels: name -> (planted bug or None). Inside their slice the buggy one
#: drops the ragged last key tile (kv_tiles_floor), so a campaign must reach it.
NARROW = {"narrow_correct": None, "narrow_buggy": "kv_tiles_floor"}
narrow_correct = _make_narrow(None)
narrow_buggy = _make_narrow("kv_tiles_floor")


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


# -- simulated device faults, for the isolation's tests on a CPU -------------------
# Each is correct on head dims that are multiples of FAULT_ALIGN and misbehaves
# on the others (as kernels with misaligned vector loads do). A fault leaves
# this process's "context" dead, as a real CUDA fault does: every later call
# in the process raises too, until reset_simulated_faults().

FAULT_ALIGN = 16
_DEAD = {"poisons_device": False, "faults_late": False}  # per process


def reset_simulated_faults():
    """Revive the simulated contexts (for tests that call these in-process)."""
    for name in _DEAD:
        _DEAD[name] = False


def _misaligned(query) -> bool:
    return query.shape[-1] % FAULT_ALIGN != 0


def poisons_device(query, key, value, **kwargs):
    """Raises "CUDA error: misaligned address" on a head dim that is not a
    multiple of FAULT_ALIGN, and on every later call in the process."""
    if _misaligned(query):
        _DEAD["poisons_device"] = True
    if _DEAD["poisons_device"]:
        raise RuntimeError("CUDA error: misaligned address\nCUDA kernel errors might be asynchronously reported at "
                           "some other API call, so the stacktrace below might be incorrect.")
    return correct_tiled(query, key, value, **kwargs)


def faults_late(query, key, value, **kwargs):
    """A fault that surfaces one call late, as an asynchronous CUDA error that
    nothing synchronised on does: a head dim that is not a multiple of
    FAULT_ALIGN returns a correct output but kills the process's "context";
    the next call, and every later one, raise an illegal memory access."""
    if _DEAD["faults_late"]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if _misaligned(query):
        _DEAD["faults_late"] = True
    return correct_tiled(query, key, value, **kwargs)


def crashes_sometimes(query, key, value, **kwargs):
    """Exits its process abruptly (status 1) on a head dim that is not a
    multiple of FAULT_ALIGN; correct otherwise."""
    if _misaligned(query):
        import os

        os._exit(1)
    return correct_tiled(query, key, value, **kwargs)


def hangs_sometimes(query, key, value, **kwargs):
    """Never returns on a head dim that is not a multiple of FAULT_ALIGN; correct otherwise."""
    if _misaligned(query):
        hangs(query, key, value)
    return correct_tiled(query, key, value, **kwargs)


#: Targets that fault, crash or hang on some cases only.
FAULTING = ("poisons_device", "faults_late", "crashes_sometimes", "hangs_sometimes")
