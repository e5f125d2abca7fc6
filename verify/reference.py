"""The certified reference of a case, and its error bounds, where they fit.

The case flow needs, per case, the oracle's result (`flashcheck.verify.oracle`)
and, per precision model, the error bound (`flashcheck.verify.bounds`). This
module decides where they are computed:

* on the host in NumPy for small cases and on CPU campaigns (the bounds are
  then computed lazily, per model, by `flashcheck.verify.check`);
* on the campaign's GPU with torch float64 (``device="cuda"``) from
  `DEVICE_MIN_SCORES` scores on, keeping the logits and probabilities on
  the device so that every model's bound is computed there too;
* tiled over query rows for cases of more than `FULL_MAX_SCORES` scores:
  each tile's oracle result (with intermediates) lives only while every
  model's bound of that tile is computed, and only the (B, H, Nq, Dv)
  results are kept. The forward oracle and the forward bounds are
  row-local (each query row is a softmax over its own keys), so the
  assembled result is the untiled one. Gradients sum over query rows; they
  are certified untiled, so gradient cases stay within `FULL_MAX_SCORES`.

>>> import numpy as np
>>> from flashcheck.properties.case import Case
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((1, 1, 6, 4)).astype(np.float16) for _ in range(3))
>>> case = Case(q=q, k=k, v=v, is_causal=True)
>>> ref, bounds = reference(case, full_max_scores=12)  # tiles of 3 rows
>>> ref.out.shape, ref.certified, bounds
((1, 1, 6, 4), True, {})
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from flashcheck.verify import oracle as _oracle
from flashcheck.verify.bounds import Bound, attention_bound
from flashcheck.verify.profile import timed

__all__ = ["DEVICE_MIN_SCORES", "FULL_MAX_SCORES", "case_scores", "oracle_device", "reference",
           "release_device_memory", "row_tiles"]

#: Cases of more scores (B * H * Nq * Nk) are judged in query-row tiles of
#: about this many scores: the oracle's float64 logits and probabilities
#: and a bound's temporaries (a dozen arrays of that size) stay near 8 GB.
FULL_MAX_SCORES = 2**26

#: From this many scores a CUDA campaign computes oracle and bounds on the
#: GPU; below, NumPy on the host is as fast (a bound is a few hundred
#: array operations, and a GPU launch costs ~10 us each).
DEVICE_MIN_SCORES = 2**14


def case_scores(case) -> int:
    """B * H * Nq * Nk of ``case``."""
    B, H, Nq, _ = case.q.shape
    return B * H * Nq * case.k.shape[2]


def oracle_device(case, device: str) -> str | None:
    """Where the oracle of ``case`` runs in a campaign on ``device``: None
    (NumPy on the host) on a CPU or for small cases, else ``device``."""
    if device == "cpu" or case_scores(case) < DEVICE_MIN_SCORES:
        return None
    return device


def release_device_memory() -> None:
    """Return the torch caching allocator's free GPU blocks to the driver."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def row_tiles(case, full_max_scores: int = FULL_MAX_SCORES) -> list[tuple[int, int]]:
    """Query-row windows (i0, i1) covering Nq, each of at most
    ``full_max_scores`` scores over all batches and heads (at least one row)."""
    B, H, Nq, _ = case.q.shape
    rows = max(1, full_max_scores // max(1, B * H * case.k.shape[2]))
    return [(i0, min(Nq, i0 + rows)) for i0 in range(0, Nq, rows)]


def reference(case, *, device: str = "cpu", models=(), with_grad: bool = False, crosscheck_rows: int = 0,
              full_max_scores: int = FULL_MAX_SCORES):
    """The oracle's result for ``case`` (finite inputs) and a dict of
    precomputed bounds ``{model.name: Bound}`` for ``models``.

    Up to ``full_max_scores`` scores the result keeps its intermediates
    (``keep=True``, on the device for device runs) and the dict is empty:
    bounds are computed when a target needs them. Above, the case is
    computed in row tiles (`row_tiles`) and every model in ``models`` gets
    its bound here; the result then has no intermediates.
    """
    if not isinstance(full_max_scores, int) or full_max_scores < 1:
        raise ValueError(f"full_max_scores must be a positive int, got {full_max_scores!r}")
    dev = oracle_device(case, device)
    if case_scores(case) <= full_max_scores:
        with timed("oracle"):
            return _oracle.attention_case(case, keep=True, with_grad=with_grad, crosscheck_rows=crosscheck_rows,
                                          device=dev), {}
    if with_grad:
        raise ValueError(f"gradients are certified untiled: a --grad case may have at most {full_max_scores} "
                         f"scores (B*H*Nq*Nk), this one has {case_scores(case)}; lower --max-scores")
    return _tiled(case, dev, models, crosscheck_rows, full_max_scores)


def _mask_rows(mask, i0: int, i1: int, Nq: int):
    """Rows i0:i1 of an attn_mask whose query axis is Nq (not 1, not absent)."""
    if mask is None or mask.ndim < 2 or mask.shape[-2] != Nq or Nq == 1:
        return mask
    return mask[..., i0:i1, :]


def _tiled(case, dev, models, crosscheck_rows, full_max_scores):
    B, H, Nq, _ = case.q.shape
    Dv = case.v.shape[3]
    names = list(dict.fromkeys(m.name for m in models))
    models = {m.name: m for m in models}
    out = np.zeros((B, H, Nq, Dv))
    err, row_scale = np.zeros_like(out), np.zeros_like(out)
    lse, lse_err = np.zeros((B, H, Nq)), np.zeros((B, H, Nq))
    b_out = {n: np.zeros_like(out) for n in names}
    b_lse = {n: np.zeros((B, H, Nq)) for n in names}
    b_fallback = {n: np.zeros((B, H, Nq), dtype=bool) for n in names}
    b_terms = {n: {} for n in names}
    first, mp_rows, mp_index, certified = None, 0, [], True
    for i0, i1 in row_tiles(case, full_max_scores):
        with timed("oracle"):
            tile = _oracle.attention_case(case, keep=True, rows=(i0, i1), device=dev)
        first = first or tile
        out[:, :, i0:i1], err[:, :, i0:i1], row_scale[:, :, i0:i1] = tile.out, tile.err_bound, tile.row_scale
        lse[:, :, i0:i1], lse_err[:, :, i0:i1] = tile.lse, tile.lse_err_bound
        mp_rows += tile.mp_rows
        mp_index.extend(tile.mp_row_index)
        certified &= tile.certified
        mask = _mask_rows(case.attn_mask, i0, i1, Nq)
        for n in names:
            with timed("bound"):
                bt = attention_bound(tile, models[n], attn_mask=mask, block_n=case.block_n)
            b_out[n][:, :, i0:i1], b_lse[n][:, :, i0:i1] = bt.out, bt.lse
            b_fallback[n][:, :, i0:i1] = bt.fallback
            for key, value in bt.terms.items():  # largest values; NaN propagates, as in one call
                prev = b_terms[n].get(key, value)
                b_terms[n][key] = math.nan if math.isnan(prev) or math.isnan(value) else max(prev, value)
        del tile
    ref = dataclasses.replace(
        first, out=out, lse=lse, err_bound=err, lse_err_bound=lse_err, row_scale=row_scale, mp_rows=mp_rows,
        certified=certified, mp_row_index=tuple(mp_index), s=None, p=None, q=None, k=None, v=None,
        row_range=None)
    if crosscheck_rows:
        with timed("oracle"):
            rep = _oracle.crosscheck(ref, case.q, case.k, case.v, attn_mask=case.attn_mask,
                                     is_causal=case.is_causal, scale=case.scale, enable_gqa=case.enable_gqa,
                                     rows=crosscheck_rows)
        if not rep.ok:
            raise _oracle.CertificationError(f"tiled oracle outside its bound on rows {rep.failures[:3]} "
                                             f"(worst ratio {rep.worst_ratio:.3g})")
    for n in names:  # a count over all rows, not a largest value
        if "fallback_rows" in b_terms[n]:
            b_terms[n]["fallback_rows"] = int(b_fallback[n].sum())
    bounds = {n: Bound(b_out[n], b_lse[n], b_fallback[n], b_terms[n]) for n in names}
    return ref, bounds
