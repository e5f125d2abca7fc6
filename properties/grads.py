"""Output gradients dO for backward checks, by magnitude class.

A backward pass is judged on the gradients it gives for one upstream
gradient dO. Gaussian dO alone misses what breaks backward kernels, so dO
has classes of its own (`DO_KINDS`), drawn independently of the inputs'
magnitude class:

``normal``        N(0, 1) entries.
``tiny``          N(0, 1) scaled to just above the format's smallest normal:
                  many gradients are subnormal (flush-to-zero, underflow).
``huge``          scaled to 2**(emax - 6 - log2(Nq * group) / 2), so that dV
                  (a P-weighted sum of dO over the queries of a group) comes
                  near the format's largest value without passing it for
                  typical rows; for bf16 and fp32 capped at 2**60 and so that
                  fp32 intermediates (dP = dO V^T) stay finite. Targets
                  overflow in intermediates and in the final conversion
                  (elements whose bound is infinite are not judged).
``zero-rows``     N(0, 1) with about half of the query rows (at least one)
                  zero, sometimes a whole head: their dQ must be exactly 0,
                  and they must add nothing to dK and dV.
``delta-cancel``  each row made orthogonal to its output row O_i (exact,
                  float64), so that Delta_i = rowsum(dO_i * O_i) is a sum of
                  large terms that cancels: Delta's rounding error, in
                  particular from the stored low-precision output, is then
                  as large as Delta itself. (With Dv = 1 such a row is 0.)

Every dO is built in float64 and rounded once to the input format
(`flashcheck.kernels.precision.from_float64`), so its values are exact
inputs. The same case, class and seed give the same dO.

>>> import numpy as np
>>> from flashcheck.properties.case import Case
>>> q = np.ones((1, 1, 3, 4), np.float16)
>>> do = output_gradient(Case(q, q, q), "zero-rows", seed=0)
>>> do.shape, do.dtype, bool((do == 0).all(-1).any())
((1, 1, 3, 4), dtype('float16'), True)
"""

from __future__ import annotations

import math

import numpy as np

from flashcheck.kernels.numpy_attention import tiled_attention
from flashcheck.kernels.precision import FORMATS, from_float64, to_float64
from flashcheck.properties.case import Case

__all__ = ["DO_KINDS", "DoDealer", "output_gradient", "with_output_gradient"]

#: Classes of output gradients (see the module docstring).
DO_KINDS = ("normal", "tiny", "huge", "zero-rows", "delta-cancel")


def _check_kind(kind):
    if kind not in DO_KINDS:
        raise ValueError(f"unknown output-gradient class {kind!r}; expected one of {DO_KINDS}")


def _exact_output(case: Case) -> np.ndarray:
    """The exact output O (float64) of the case, in one tile."""
    nq, nk = case.q.shape[2], case.k.shape[2]
    return tiled_attention(case.q, case.k, case.v, case.attn_mask, case.is_causal, case.scale, case.enable_gqa,
                           block_m=max(nq, 1), block_n=max(nk, 1))


def output_gradient(case: Case, kind: str, seed: int) -> np.ndarray:
    """dO of class ``kind`` for ``case``: shape (B, H, Nq, Dv), in the case's
    input dtype, exact. ``seed`` (a non-negative integer) fixes it.

    Raises ValueError for an unknown class or a bad seed, and for
    "delta-cancel" on a case with NaN or Inf inputs (its output is needed).
    """
    if not isinstance(case, Case):
        raise TypeError(f"output_gradient needs a flashcheck.properties.case.Case, got {type(case).__name__}")
    _check_kind(kind)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    B, H, Nq, _ = case.q.shape
    Dv = case.v.shape[-1]
    fmt = FORMATS[case.dtype]
    rng = np.random.default_rng([int(seed), 0xD0])
    g = rng.standard_normal((B, H, Nq, Dv))
    if kind == "tiny":
        g = g * fmt.tiny * 4
    elif kind == "huge":
        group = H // case.k.shape[1]
        # dV_j sums dO over the group's queries, weighted by P: typically ~sqrt(n) of them add up.
        e = math.floor(math.log2(fmt.max)) - 6 - math.ceil(math.log2(max(1, Nq * group))) // 2
        if case.dtype != "fp16":
            # Keep dP = dO V^T (fp32) finite: |dP| <= Dv max|dO| max|V|.
            vmax = float(np.max(np.abs(to_float64(case.v)), initial=1.0))
            vmax = vmax if math.isfinite(vmax) and vmax > 1 else 1.0
            e = min(e, 60, 126 - 8 - math.ceil(math.log2(Dv * vmax)))
        g = g * 2.0**e
    elif kind == "zero-rows":
        zero = rng.random((B, H, Nq)) < 0.5
        zero.flat[rng.integers(zero.size)] = True
        if H > 1 and rng.random() < 0.5:
            zero[:, rng.integers(H)] = True
        g = np.where(zero[..., None], 0.0, g)
    elif kind == "delta-cancel":
        if not all(np.isfinite(to_float64(t)).all() for t in (case.q, case.k, case.v)):
            raise ValueError("output gradient class 'delta-cancel' needs finite inputs (it is built from the "
                             "exact output); use another class for NaN/Inf cases")
        o = _exact_output(case)
        norm2 = (o * o).sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            proj = np.where(norm2 > 0, (g * o).sum(-1, keepdims=True) / norm2, 0.0)
        g = g - proj * o
    return from_float64(g, case.dtype)


def with_output_gradient(case: Case, kind: str, seed: int | None = None) -> Case:
    """``case`` with ``do`` of class ``kind`` (seeded from ``case.seed`` when
    ``seed`` is None) and the class in ``case.tags["do"]``."""
    seed = (case.seed or 0) if seed is None else seed
    do = output_gradient(case, kind, seed)
    return case.replace(do=do, tags={**case.tags, "do": kind})


class DoDealer:
    """Deals output-gradient classes in shuffled rounds (each class once per
    round), independently of the plan's features.

    >>> [DoDealer(seed=0).deal() in DO_KINDS for _ in range(3)]
    [True, True, True]
    """

    def __init__(self, kinds=DO_KINDS, seed: int = 0):
        kinds = tuple(dict.fromkeys(kinds))
        if not kinds:
            raise ValueError(f"DoDealer needs at least one class of {DO_KINDS}")
        for kind in kinds:
            _check_kind(kind)
        self.kinds = kinds
        self._rng = np.random.default_rng([int(seed), 0xD0D0])
        self._deck: list = []

    def deal(self) -> str:
        if not self._deck:
            self._deck = self._rng.permutation(len(self.kinds)).tolist()
        return self.kinds[self._deck.pop()]
