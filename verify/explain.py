"""What is special about a failing case: features a person can act on.

A verdict says *that* an element is wrong; this module says *where it sits*
and *what the wrong value looks like*, from the case alone:

- `case_features`: properties of the whole call that kernels get wrong
  (GQA, causal with Nq != Nk, non-contiguous layouts, a mask, ragged lengths,
  odd head dims, the magnitude class of the inputs);
- `row_features`: properties of the failing query row (no visible key, a
  NaN or Inf it reads, or one that hides only behind the mask, the last
  partial tile);
- `diagnose`: which plausible wrong semantics the observed row equals (the
  mask ignored, causal aligned bottom-right, the wrong KV head, zeros, ...).

Every feature is one of the fixed strings below, so that known-issue files
(`flashcheck.verify.known`) can name them. General features ("shared KV heads",
"attn_mask", "non-contiguous layout") come before their specific kinds.

>>> import numpy as np
>>> from flashcheck.properties.case import Case
>>> q = np.ones((1, 2, 3, 16), np.float16); kv = np.ones((1, 1, 5, 16), np.float16)
>>> case_features(Case(q, kv, kv, enable_gqa=True, is_causal=True))[:4]
['shared KV heads', 'MQA', 'causal', 'causal with Nq != Nk']
"""

from __future__ import annotations

import math

import numpy as np

from flashcheck.kernels.precision import format_of, to_float64
from flashcheck.properties.case import Case

__all__ = [
    "CASE_FEATURES",
    "KEY_FEATURES",
    "ROW_FEATURES",
    "TILE",
    "TRIGGERS",
    "case_features",
    "diagnose",
    "diagnose_gradient",
    "key_features",
    "row_features",
    "trigger",
    "visibility",
    "zero_nonfinite",
]

#: Tile edge used for "ragged" features: most fused kernels tile by 64 or 128,
#: and a length that is not a multiple of 64 is not one of 128 either.
TILE = 64

#: Case-level features, in report order.
CASE_FEATURES = (
    "shared KV heads", "MQA", "GQA", "causal", "causal with Nq != Nk", "attn_mask", "bool mask", "additive mask",
    "-inf in additive mask", "non-contiguous layout", "bnhd layout", "strided layout", "Dv != D",
    "head dim not a multiple of 8", "head dim not a multiple of 16",
    "head dim over 128", "Nq not a multiple of 64", "Nk not a multiple of 64", "Nk over 65536", "single query",
    "explicit scale", "NaN in inputs", "Inf in inputs",
)
#: Row-level features of the failing query row, in report order.
ROW_FEATURES = (
    "fully masked row", "NaN in query row", "Inf in query row", "reads NaN key/value", "reads Inf key/value",
    "NaN/Inf only in masked keys", "row sees one key", "row in last partial query tile",
    "row sees the last partial key tile",
)
#: Features of the failing key row of a dK or dV failure, in report order.
KEY_FEATURES = ("key seen by no query", "key seen by one query", "key in last partial key tile",
                "key seen by the last partial query tile")
#: Row features strong enough to name a failure by (`trigger`), strongest first.
TRIGGERS = ("fully masked row", "NaN in query row", "reads NaN key/value", "Inf in query row",
            "reads Inf key/value", "NaN/Inf only in masked keys", "key seen by no query")


def visibility(case: Case) -> np.ndarray:
    """(B, H, Nq, Nk) bools: which keys each query may attend to (SDPA's
    top-left causal alignment, bool masks True = attend, additive -inf = masked)."""
    B, H, Nq, _ = case.q.shape
    Nk = case.k.shape[2]
    vis = np.ones((B, H, Nq, Nk), dtype=bool)
    if case.is_causal:
        vis &= np.tril(np.ones((Nq, Nk), dtype=bool))
    if case.attn_mask is not None:
        mask = np.asarray(case.attn_mask)
        allowed = mask if mask.dtype == bool else ~np.isneginf(to_float64(mask))
        vis &= np.broadcast_to(allowed, vis.shape)
    return vis


def _row_masks(case: Case, b: int, h: int, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(Nk,) bools for query row (b, h, i): the keys the attn_mask leaves
    visible, and the keys causality leaves visible (top-left); the row
    sees their conjunction when the case is causal (`visibility`'s row)."""
    B, H, Nq, _ = case.q.shape
    Nk = case.k.shape[2]
    explicit = np.ones(Nk, dtype=bool)
    if case.attn_mask is not None:
        m = np.broadcast_to(np.asarray(case.attn_mask), (B, H, Nq, Nk))[b, h, i]
        explicit = m if m.dtype == bool else ~np.isneginf(to_float64(m))
    return explicit, np.arange(Nk) <= i


def _row_visible(case: Case, b: int, h: int, i: int) -> np.ndarray:
    explicit, causal = _row_masks(case, b, h, i)
    return explicit & causal if case.is_causal else explicit


def case_features(case: Case) -> list[str]:
    """The `CASE_FEATURES` that hold for ``case``, in that order."""
    B, H, Nq, D = case.q.shape
    Hkv, Nk, Dv = case.k.shape[1], case.k.shape[2], case.v.shape[3]
    mask = case.attn_mask
    values = [to_float64(t) for t in (case.q, case.k, case.v)]
    holds = {
        "shared KV heads": Hkv < H,
        "attn_mask": mask is not None,
        "non-contiguous layout": case.layout != "contiguous",
        "MQA": Hkv == 1 and H > 1,
        "GQA": 1 < Hkv < H,
        "causal": case.is_causal,
        "causal with Nq != Nk": case.is_causal and Nq != Nk,
        "bool mask": mask is not None and mask.dtype == bool,
        "additive mask": mask is not None and mask.dtype != bool,
        "-inf in additive mask": mask is not None and mask.dtype != bool and bool(np.isneginf(to_float64(mask)).any()),
        "bnhd layout": case.layout == "bnhd",
        "strided layout": case.layout == "strided",
        "Dv != D": Dv != D,
        "head dim not a multiple of 8": D % 8 != 0,
        "head dim not a multiple of 16": D % 16 != 0,
        "head dim over 128": max(D, Dv) > 128,
        "Nq not a multiple of 64": Nq % TILE != 0,
        "Nk not a multiple of 64": Nk % TILE != 0,
        "Nk over 65536": Nk > 65536,
        "single query": Nq == 1,
        "explicit scale": case.scale is not None,
        "NaN in inputs": any(np.isnan(x).any() for x in values),
        "Inf in inputs": any(np.isinf(x).any() for x in values),
    }
    feats = [f for f in CASE_FEATURES if holds[f]]
    if case.magnitude not in ("normal", None):
        feats.append(f"magnitude {case.magnitude}")
    if case.do is not None and case.tags.get("do") not in ("normal", None):
        feats.append(f"dO {case.tags['do']}")
    return feats


def key_features(case: Case, at) -> list[str]:
    """The `KEY_FEATURES` of key row ``at[:3]`` = (b, kv head, j) of a dK or
    dV failure, in that order; [] when ``at`` does not name a key."""
    if at is None or len(at) < 3:
        return []
    b, hk, j = (int(x) for x in at[:3])
    B, H, Nq, _ = case.q.shape
    Hkv, Nk = case.k.shape[1], case.k.shape[2]
    if not (0 <= b < B and 0 <= hk < Hkv and 0 <= j < Nk):
        return []
    group = H // Hkv
    heads = slice(hk * group, (hk + 1) * group)
    seen_by = np.ones((group, Nq), dtype=bool)  # key j's column of `visibility` for the group's heads
    if case.is_causal:
        seen_by &= np.arange(Nq) >= j
    if case.attn_mask is not None:
        m = np.broadcast_to(np.asarray(case.attn_mask), (B, H, Nq, Nk))[b, heads, :, j]
        seen_by &= m if m.dtype == bool else ~np.isneginf(to_float64(m))
    rows = np.flatnonzero(seen_by.any(0))
    holds = {
        "key seen by no query": not seen_by.any(),
        "key seen by one query": int(seen_by.sum()) == 1,
        "key in last partial key tile": Nk % TILE != 0 and j >= Nk - Nk % TILE,
        "key seen by the last partial query tile": Nq % TILE != 0 and bool((rows >= Nq - Nq % TILE).any()),
    }
    return [f for f in KEY_FEATURES if holds[f]]


def row_features(case: Case, at) -> list[str]:
    """The `ROW_FEATURES` of query row ``at[:3]`` = (b, h, i), in that order;
    [] when ``at`` does not name a row."""
    if at is None or len(at) < 3:
        return []
    b, h, i = (int(x) for x in at[:3])
    B, H, Nq, _ = case.q.shape
    if not (0 <= b < B and 0 <= h < H and 0 <= i < Nq):
        return []
    Nk = case.k.shape[2]
    hk = h // (H // case.k.shape[1])
    seen = _row_visible(case, b, h, i)
    q = to_float64(case.q[b, h, i])
    k, v = to_float64(case.k[b, hk]), to_float64(case.v[b, hk])
    kv_nan = np.isnan(k).any(-1) | np.isnan(v).any(-1)
    kv_inf = np.isinf(k).any(-1) | np.isinf(v).any(-1)
    last_q = Nq - Nq % TILE
    holds = {
        "fully masked row": not seen.any(),
        "NaN in query row": bool(np.isnan(q).any()),
        "Inf in query row": bool(np.isinf(q).any()),
        "reads NaN key/value": bool((kv_nan & seen).any()),
        "reads Inf key/value": bool((kv_inf & seen).any()),
        "NaN/Inf only in masked keys": bool(((kv_nan | kv_inf) & ~seen).any() and not ((kv_nan | kv_inf) & seen).any()),
        "row sees one key": int(seen.sum()) == 1,
        "row in last partial query tile": Nq % TILE != 0 and i >= last_q,
        "row sees the last partial key tile": Nk % TILE != 0 and bool(seen[Nk - Nk % TILE:].any()),
    }
    return [f for f in ROW_FEATURES if holds[f]]


def trigger(features) -> str | None:
    """The strongest of ``features`` that names a failure (`TRIGGERS`), or None."""
    for name in TRIGGERS:
        if name in features:
            return name
    return None


# -- diagnosis ------------------------------------------------------------------
def _row_attention(q, k, v, visible, scale) -> np.ndarray:
    """One query row of attention in float64; a row with no visible key is 0."""
    if not visible.any():
        return np.zeros(v.shape[-1])
    s = np.where(visible, (k @ q) * scale, -np.inf)
    p = np.exp(s - s.max())
    return (p / p.sum()) @ v


def _row_semantics(case: Case, b: int, h: int, i: int) -> tuple[np.ndarray, dict]:
    """Row (b, h, i) of a finite ``case`` in float64: the exact row, and the
    row under each plausible wrong semantics."""
    B, H, Nq, D = case.q.shape
    Hkv, Nk = case.k.shape[1], case.k.shape[2]
    group = H // Hkv
    q, k, v = to_float64(case.q[b, h, i]), to_float64(case.k[b]), to_float64(case.v[b])
    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(D)
    explicit, causal = _row_masks(case, b, h, i)
    seen = _row_visible(case, b, h, i)
    hk = h // group
    exact = _row_attention(q, k[hk], v[hk], seen, scale)
    alts = {}
    if case.attn_mask is not None:
        unmasked = causal if case.is_causal else np.ones(Nk, dtype=bool)
        alts["the attn_mask ignored"] = _row_attention(q, k[hk], v[hk], unmasked, scale)
    if case.is_causal:
        alts["causal ignored"] = _row_attention(q, k[hk], v[hk], explicit, scale)
        if Nq != Nk:
            bottom_right = np.arange(Nk) <= i + Nk - Nq
            alts["causal aligned bottom-right"] = _row_attention(q, k[hk], v[hk], explicit & bottom_right, scale)
    if group > 1 or Hkv > 1:
        for name, other in (("KV head h % Hkv", h % Hkv), ("KV head 0", 0)):
            if other != hk:
                alts[f"the wrong KV head ({name})"] = _row_attention(q, k[other], v[other], seen, scale)
    if scale != 1.0:
        alts["scale 1 (scale ignored)"] = _row_attention(q, k[hk], v[hk], seen, 1.0)
    if case.scale is not None and case.scale != 1.0 / math.sqrt(D):
        alts["the default scale 1/sqrt(D)"] = _row_attention(q, k[hk], v[hk], seen, 1.0 / math.sqrt(D))
    if seen.any():
        alts["the mean of the visible values (uniform weights)"] = v[hk][seen].mean(axis=0)
    return exact, alts


def diagnose(case: Case, out, at, *, allowed: float = 0.0) -> str | None:
    """What the observed row ``out[at[:3]]`` looks like, when it is plainly
    one thing: "all NaN", "all zero", a subnormal element ``out[at]`` flushed
    to zero, or "equals <alternative>" for the first
    wrong semantics it matches (`_row_semantics`). A row matches an
    alternative when its distance to it is at most ``tol`` and at most 1/16
    of its distance to the exact row, where ``tol`` is ``allowed`` (the
    bound at the failing element) or 8 units in the last place of the
    row's largest value, whichever is larger. None when nothing fits."""
    if at is None or len(at) < 3:
        return None
    b, h, i = (int(x) for x in at[:3])
    o = to_float64(out)
    if o.ndim != 4 or not (b < o.shape[0] and h < o.shape[1] and i < o.shape[2]):
        return None
    row = o[b, h, i]
    if np.isnan(row).all():
        return "output row is all NaN"
    if not np.isfinite(row).all():
        return "output row has NaN or Inf"
    exact, alts = _row_semantics(zero_nonfinite(case), b, h, i)
    fmt = format_of(case.q.dtype)
    if not row.any():
        if not exact.any():
            return None
        # Every nonzero exact value below the smallest normal: a flush to zero, not a lost row.
        return ("subnormal output flushed to zero" if np.all(np.abs(exact[exact != 0]) < fmt.tiny)
                else "output row is all zero")
    if len(at) == 4 and int(at[3]) < row.size:
        got, want = row[int(at[3])], exact[int(at[3])]
        if got == 0 and 0 < abs(want) < fmt.tiny:
            return "subnormal output flushed to zero"
    u = fmt.u
    tol = max(float(allowed), 8 * u * float(np.max(np.abs(row), initial=0.0)))
    d_exact = float(np.max(np.abs(row - exact), initial=0.0))
    for name, alt in alts.items():
        d = float(np.max(np.abs(row - alt), initial=0.0))
        if d <= tol and d <= d_exact / 16:
            return f"output row equals {name}"
    return None


def diagnose_gradient(name: str, got, exact, at) -> str | None:
    """What the failing row of gradient ``name`` (dq, dk or dv) looks like,
    when it is plainly one thing: all NaN, all zero, or nonzero where the
    exact gradient row is zero (a row that must get no gradient)."""
    if at is None or len(at) < 3:
        return None
    g, x = to_float64(got), to_float64(exact)
    if g.ndim != 4 or g.shape != x.shape:
        return None
    b, h, i = (int(a) for a in at[:3])
    row, want = g[b, h, i], x[b, h, i]
    if np.isnan(row).all():
        return f"{name} row is all NaN"
    if not np.isfinite(row).all():
        return f"{name} row has NaN or Inf"
    if not row.any() and want.any():
        return f"{name} row is all zero"
    if row.any() and not want.any():
        return f"{name} row is nonzero where the exact gradient is zero"
    return None


def zero_nonfinite(case: Case) -> Case:
    """``case`` with every NaN and Inf of q, k and v replaced by 0 (same dtype)."""
    def zeroed(arr):
        x = to_float64(arr)
        return np.where(np.isfinite(x), x, 0.0).astype(arr.dtype)

    return case.replace(q=zeroed(case.q), k=zeroed(case.k), v=zeroed(case.v))
