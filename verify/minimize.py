"""Shrinking a failing case while its failure still reproduces.

`minimize` takes a failing case and a predicate ``reproduces(case)`` that
runs the target and says whether the same failure signature shows (the
campaign builds it from `flashcheck.verify.check.run_case` and
`flashcheck.verify.signatures`). It tries smaller cases in a fixed order
and keeps each one that still reproduces, until a whole pass changes
nothing or the budget is spent:

1. one batch entry (the failing one), one head (or one KV group);
2. fewer query rows (up to the failing row, the failing row alone, halves);
3. fewer keys (halves, or only the keys the failing row can see);
4. a smaller head dim (halves);
5. plainer structure: contiguous layout, no causal, no mask, MHA.

Every candidate is a slice of the original arrays, so its values are the
exact inputs that failed. The structural features that could not be
removed on the final case are its "needs": what the bug depends on.

>>> import numpy as np
>>> from flashcheck.properties.case import Case
>>> q = np.zeros((2, 3, 40, 16), np.float16); kv = np.zeros((2, 3, 50, 16), np.float16)
>>> small = minimize(Case(q, kv, kv), lambda c: c.q.shape[2] >= 7 and c.q.shape[3] >= 8, budget_s=10).case
>>> small.q.shape, small.k.shape
((1, 1, 7, 8), (1, 1, 1, 8))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from flashcheck.properties.case import Case

__all__ = ["Minimized", "candidates", "minimize", "size_of", "structural_removals"]


@dataclass
class Minimized:
    case: Case  # the smallest case that still reproduces
    result: object  # what ``reproduces`` returned for it (truthy)
    steps: list = field(default_factory=list)  # descriptions of the accepted shrinks, in order
    attempts: int = 0  # how many candidates were run
    needs: list = field(default_factory=list)  # structural features that could not be removed
    seconds: float = 0.0
    exhausted: bool = False  # stopped by the budget rather than by a pass without progress


def size_of(case: Case) -> int:
    """Elements a case holds (q, k, v and the mask): what minimization lowers."""
    n = case.q.size + case.k.size + case.v.size
    return n + (0 if case.attn_mask is None else case.attn_mask.size)


# -- slicing --------------------------------------------------------------------
def _mask4(mask: np.ndarray) -> np.ndarray:
    return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def _slice_mask(mask, axis: int, index) -> np.ndarray | None:
    """Slice a broadcastable mask along (B, H, Nq, Nk) axis ``axis``; size-1
    (broadcast) axes are kept; the mask keeps its rank."""
    if mask is None:
        return None
    m = _mask4(mask)
    if m.shape[axis] > 1:
        m = np.take(m, index, axis=axis)
    return m.reshape(m.shape[4 - mask.ndim:]) if mask.ndim < 4 else m


def take(case: Case, *, batch=None, q_heads=None, kv_heads=None, rows=None, keys=None, dims=None,
         v_dims=None) -> Case:
    """The sub-case on the given index lists (None keeps an axis whole)."""
    q, k, v, mask, do = case.q, case.k, case.v, case.attn_mask, case.do
    # The output gradient (B, H, Nq, Dv) follows q's batch, heads and rows and v's head dim.
    if batch is not None:
        q, k, v = q[batch], k[batch], v[batch]
        do = None if do is None else do[batch]
        mask = _slice_mask(mask, 0, batch)
    if q_heads is not None:
        q = q[:, q_heads]
        do = None if do is None else do[:, q_heads]
        mask = _slice_mask(mask, 1, q_heads)
    if kv_heads is not None:
        k, v = k[:, kv_heads], v[:, kv_heads]
    if rows is not None:
        q = q[:, :, rows]
        do = None if do is None else do[:, :, rows]
        mask = _slice_mask(mask, 2, rows)
    if keys is not None:
        k, v = k[:, :, keys], v[:, :, keys]
        mask = _slice_mask(mask, 3, keys)
    if dims is not None:
        q, k = q[..., dims], k[..., dims]
    if v_dims is not None:
        v = v[..., v_dims]
        do = None if do is None else do[..., v_dims]
    arrays = {n: np.ascontiguousarray(a) for n, a in (("q", q), ("k", k), ("v", v))}
    gqa = case.enable_gqa and arrays["q"].shape[1] != arrays["k"].shape[1]
    return case.replace(**arrays, attn_mask=None if mask is None else np.ascontiguousarray(mask), enable_gqa=gqa,
                        do=None if do is None else np.ascontiguousarray(do), tags={**case.tags, "minimized": True})


def _parts(n: int) -> list[int]:
    """How many of ``n`` to drop: a half, a quarter, a sixteenth, then one."""
    return sorted({p for p in (n // 2, n // 4, n // 16, 1) if 0 < p < n}, reverse=True)


def _index(at, axis: int, default: int = 0) -> int:
    return int(at[axis]) if at is not None and len(at) > axis else default


def structural_removals(case: Case, at=None) -> Iterator[tuple[str, str, Case]]:
    """(feature, description, case without it) for each structural feature
    ``case`` has: shared KV heads (GQA/MQA), a non-contiguous layout, causal,
    an attn_mask. The feature names are `flashcheck.verify.explain.CASE_FEATURES`'
    general ones, so a bug found with a bool and with an additive mask is one."""
    H, Hkv = case.q.shape[1], case.k.shape[1]
    if Hkv != H:
        h = min(_index(at, 1), H - 1)
        yield "shared KV heads", f"MHA (query head {h} with its KV head)", take(case, q_heads=[h],
                                                                                kv_heads=[h // (H // Hkv)])
    if case.layout != "contiguous":
        yield "non-contiguous layout", "contiguous layout", case.replace(layout="contiguous")
    if case.is_causal:
        yield "causal", "not causal", case.replace(is_causal=False)
    if case.attn_mask is not None:
        yield "attn_mask", "no attn_mask", case.replace(attn_mask=None, mask_kind="none")


def candidates(case: Case, at=None) -> Iterator[tuple[str, Case]]:
    """Smaller cases to try, biggest reductions first; ``at`` is the
    failing (b, h, i, ...) index, when the failure has one."""
    B, H, Nq, D = case.q.shape
    Hkv, Nk, Dv = case.k.shape[1], case.k.shape[2], case.v.shape[3]
    b, h, i = min(_index(at, 0), B - 1), min(_index(at, 1), H - 1), min(_index(at, 2, Nq - 1), Nq - 1)
    group = H // Hkv
    if B > 1:
        yield f"batch entry {b} only", take(case, batch=[b])
    if H > 1 and Hkv == H:
        yield f"head {h} only", take(case, q_heads=[h], kv_heads=[h])
    if Hkv < H:
        g = h // group
        if Hkv > 1:
            yield f"KV group {g} only", take(case, q_heads=list(range(g * group, (g + 1) * group)), kv_heads=[g])
        if group > 2:
            other = g * group + (1 if h % group == 0 else 0)
            yield "two query heads of the group", take(case, q_heads=sorted({h, other}), kv_heads=[g])
    if i + 1 < Nq:
        yield f"query rows 0..{i}", take(case, rows=list(range(i + 1)))
    if Nq > 1:
        yield f"query row {i} alone", take(case, rows=[i])
        for part in _parts(Nq):  # drop a shrinking share of rows from the end or, past the failing row, the start
            if Nq - part > i:
                yield f"first {Nq - part} query rows", take(case, rows=list(range(Nq - part)))
            elif i >= part:
                yield f"last {Nq - part} query rows", take(case, rows=list(range(part, Nq)))
    if Nk > 1:
        if case.is_causal and i + 1 < Nk:
            yield f"keys 0..{i}", take(case, keys=list(range(i + 1)))
        for part in _parts(Nk):
            yield f"first {Nk - part} keys", take(case, keys=list(range(Nk - part)))
            yield f"last {Nk - part} keys", take(case, keys=list(range(part, Nk)))
    if D > 1:
        half = list(range(D // 2))
        yield f"head dim {D // 2}", take(case, dims=half, v_dims=half if Dv == D else None)
    if Dv > 1 and Dv != D:
        yield f"value head dim {Dv // 2}", take(case, v_dims=list(range(Dv // 2)))
    for _, description, smaller in structural_removals(case, at):
        yield description, smaller


def minimize(case: Case, reproduces: Callable[[Case], object], *, at=None, budget_s: float = 60.0,
             max_attempts: int = 80, locate: Callable[[object], object] | None = None) -> Minimized:
    """Shrink ``case`` while ``reproduces(candidate)`` is truthy.

    ``reproduces`` returns something truthy (kept as ``Minimized.result``)
    when the candidate shows the same failure; it must not raise for a
    candidate the target declines (return a falsy value). ``at`` is the
    failing index of ``case``; ``locate(result)`` gives the failing index of
    an accepted candidate from what ``reproduces`` returned. The search
    stops after ``budget_s`` seconds or ``max_attempts`` candidates; the
    shrinking gets 3/4 of each, so that the final pass that finds what the
    case needs (at most four runs) always happens.
    """
    if budget_s <= 0 or max_attempts < 1:
        raise ValueError(f"minimize needs a positive budget; got budget_s={budget_s}, max_attempts={max_attempts}")
    start = time.monotonic()
    best = Minimized(case=case, result=None)
    seen = {case.case_id}

    def out_of_budget() -> bool:
        return time.monotonic() - start > 0.75 * budget_s or best.attempts >= max(1, (3 * max_attempts) // 4)

    def tried(candidate: Case, description: str) -> bool:
        """Run ``candidate``; keep it as the best case when it reproduces."""
        nonlocal at
        seen.add(candidate.case_id)
        best.attempts += 1
        got = reproduces(candidate)
        if got:
            best.case, best.result = candidate, got
            best.steps.append(description)
            at = locate(got) if locate is not None else None
        return bool(got)

    progress = True
    while progress and not out_of_budget():
        progress = False
        for description, smaller in candidates(best.case, at):
            if out_of_budget():
                best.exhausted = True
                break
            if size_of(smaller) > size_of(best.case) or smaller.case_id in seen:
                continue
            if tried(smaller, description):
                progress = True
                break  # restart from the biggest reductions on the smaller case
    # What the final case still needs: each structural removal fails on it.
    # Removals are re-derived from the current case after each accepted one.
    checked: set = set()
    while True:
        pending = [(f, w) for f, _, w in structural_removals(best.case, at) if f not in checked]
        if not pending:
            break
        feature, without = pending[0]
        checked.add(feature)
        # A removal seen before was tried on this very case and did not reproduce.
        if without.case_id in seen or not tried(without, f"without {feature}"):
            best.needs.append(feature)
    best.seconds = time.monotonic() - start
    return best
