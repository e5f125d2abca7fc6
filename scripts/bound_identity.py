"""Bounds of generated cases, for comparing two versions of the bound code.

    PYTHONPATH=<tree> python scripts/bound_identity.py OUT.pkl [N_CASES] [SEED] [MAX_SCORES]

writes, for ``N_CASES`` cases dealt over every feature (dtypes, masks,
GQA/MQA, lengths, block sizes), the forward bound of every named model for
the case's dtype (and a two-part split-KV bound for online models) and the
gradient bound (from the forward bound and from saved outputs). Run it
under two trees and compare the pickles with ``--compare A.pkl B.pkl``
(bit-identical arrays expected).
"""

from __future__ import annotations

import pickle
import sys

import numpy as np


def cases(n, seed=0, max_scores=None):
    """(case, ref) pairs: generated cases with an output gradient and the oracle's intermediates."""
    from flashcheck.properties.grads import DoDealer, with_output_gradient
    from flashcheck.properties.plans import CHOICE_MAX, N_CHOICES, PlanDealer, case_from_plan, feature_values
    from flashcheck.verify.oracle import attention_case

    dealer, dos = PlanDealer(feature_values(), seed=seed), DoDealer(seed=seed)
    rng = np.random.default_rng(seed)
    done = 0
    while done < n:
        plan = dealer.deal()
        case = case_from_plan(plan, rng.integers(0, CHOICE_MAX + 1, N_CHOICES), block_kind="numpy",
                              max_scores=max_scores)
        try:
            case = with_output_gradient(case, dos.deal())
            ref = attention_case(case, keep=True, with_grad=True)
        except ValueError:  # special values (inf, NaN inputs): no bound applies
            continue
        done += 1
        yield case, ref


def bounds_of(case, ref):
    """Every bound of one case, keyed by (model, variant)."""
    from flashcheck.kernels.models import MODELS_FOR_DTYPE, get_model
    from flashcheck.kernels.precision import format_of
    from flashcheck.verify.bounds import attention_bound
    from flashcheck.verify.grad_bounds import gradient_bound

    out = {}
    fmt = format_of(case.q.dtype).name
    nk = case.k.shape[-2]
    for name in MODELS_FOR_DTYPE[fmt]:
        model = get_model(name, fmt)
        b = attention_bound(ref, model, attn_mask=case.attn_mask, block_n=case.block_n)
        out[name, "fwd"] = (b.out, b.lse, b.fallback, b.terms)
        if model.softmax == "online" and nk > 1:
            parts = [np.arange(0, nk // 2), np.arange(nk // 2, nk)]
            b = attention_bound(ref, model, attn_mask=case.attn_mask, partition=parts)
            out[name, "split"] = (b.out, b.lse, b.fallback, b.terms)
        g = gradient_bound(ref, model, dout=case.do, attn_mask=case.attn_mask)
        out[name, "grad"] = (g.dq, g.dk, g.dv, g.terms)
        if model.softmax == "online":
            g = gradient_bound(ref, model, dout=case.do, attn_mask=case.attn_mask,
                               out_target=ref.out.astype(np.float32), lse_target=ref.lse.astype(np.float32))
            out[name, "grad-saved"] = (g.dq, g.dk, g.dv, g.terms)
    return out


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) or (a[k] != a[k] and b[k] != b[k]) for k in a)
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def compare(path_a, path_b):
    with open(path_a, "rb") as f:
        a = pickle.load(f)
    with open(path_b, "rb") as f:
        b = pickle.load(f)
    assert len(a) == len(b), (len(a), len(b))
    bad, n_bounds, models = [], 0, set()
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), i
        for key in x:
            n_bounds += 1
            models.add(key[0])
            if not all(_same(u, w) for u, w in zip(x[key], y[key])):
                bad.append((i, key))
    print(f"{len(a)} cases, {n_bounds} bounds, models {sorted(models)}: {len(bad)} differ {bad[:10]}")
    return not bad


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(0 if compare(sys.argv[2], sys.argv[3]) else 1)
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    max_scores = int(sys.argv[4]) if len(sys.argv) > 4 else None
    res = [bounds_of(case, ref) for case, ref in cases(n, seed, max_scores)]
    with open(sys.argv[1], "wb") as f:
        pickle.dump(res, f)
