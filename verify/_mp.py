"""Exact and multiple-precision helpers for the oracle.

Every input of the oracle is a dyadic rational (a float), so dot products,
logit sums and the max shift are done exactly in Python integers; only exp
(and log for the LSE) is evaluated with mpmath at a chosen precision. The
exp values are truncated to a fixed point grid, after which the sums and the
P V products are again exact integers, and the one division per output
element is correctly rounded by Python's int / int.

>>> m, e = dyadic_ints(np.array([0.75, -2.0]))
>>> [int(x) for x in m], e
([3, -8], -2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import mpmath
import numpy as np

__all__ = ["CERT_SAFETY", "MpRow", "dyadic_ints", "mp_exp_weights", "ratio_to_float"]

U64 = 2.0**-53
#: The oracle's certification safety factor, on every bound it certifies (the
#: float64 pass in oracle.py and the multiple-precision rows here). It
#: multiplies every first-order bound and absorbs the neglected second-order
#: terms (all products of two quantities <= 0.01 times first-order ones, and
#: factors (1 + gamma_n) <= 1 + 1e-6 for n <= 2**33) and the rounding in the
#: evaluation of the bound itself (a few dozen operations, relative 1e-14).
#: Not to be confused with the precision bounds' float-evaluation margin
#: (`flashcheck.verify.bound_terms.EVAL_MARGIN`).
CERT_SAFETY = 2.0


def dyadic_ints(x) -> tuple[np.ndarray, int]:
    """Integers ``M`` (object array of Python ints) and an exponent ``E``
    with ``x == M * 2**E`` exactly, for finite float64 values ``x``."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("dyadic_ints needs finite values")
    m, e = np.frexp(x)
    mant = np.ldexp(m, 53).astype(np.int64)  # exact: |m| < 1
    ex = e.astype(np.int64) - 53
    nz = mant != 0
    if not nz.any():
        return np.zeros(x.shape, dtype=np.int64).astype(object), 0
    low = mant & -mant  # lowest set bit: strip trailing zeros to keep the ints short
    tz = np.zeros_like(mant)
    tz[nz] = np.log2(low[nz].astype(np.float64)).astype(np.int64)
    mant = mant >> tz
    ex = ex + tz
    E = int(ex[nz].min())
    shift = np.where(nz, ex - E, 0)
    return mant.astype(object) << shift.astype(object), E


def ratio_to_float(num: int, den: int, exp2: int) -> float:
    """num * 2**exp2 / den correctly rounded to float64 (den > 0)."""
    if exp2 >= 0:
        num <<= exp2
    else:
        den <<= -exp2
    return num / den  # Python's int / int rounds correctly, subnormals included


def ratio_fraction(num: int, den: int, exp2: int) -> Fraction:
    return Fraction(num * 2**exp2, den) if exp2 >= 0 else Fraction(num, den * 2 ** (-exp2))


@dataclass
class MpWeights:
    """Fixed point exp weights of one row: ``e_j ~ ints[j] * 2**e0``."""

    ints: np.ndarray  # object, Python ints (0 for masked or negligible entries)
    e0: int
    total: int  # sum of ints
    w: np.ndarray  # float64 bound on |ints[j]*2**e0 - exp(d_j)|
    rel: float  # max relative part of w (for the P error of gradients)
    abs_: float  # absolute part of w per entry


def mp_exp_weights(d_int: np.ndarray, d_exp: int, allowed: np.ndarray, prec: int) -> MpWeights:
    """exp(d_j) for d_j = d_int[j] * 2**d_exp <= 0 (allowed entries only).

    Each weight is exp evaluated at ``prec`` bits and truncated to a multiple
    of 2**e0, e0 = -(prec + 64 + bitlen(n)). Error per entry (bounded in ``w``):
    d rounded to prec bits (relative 2**-prec), mpmath's exp (taken as at most
    8 units in the last place), truncation (< 2**e0); entries with
    exp(d_j) < 2**e0 are set to 0, again an error < 2**e0.
    """
    n = d_int.shape[0]
    e0 = -(prec + 64 + n.bit_length())
    cutoff = -e0 * math.log(2.0)  # exp(-cutoff) = 2**e0
    rho = 2.0 ** (4 - prec)
    ints = np.zeros(n, dtype=np.int64).astype(object)
    w = np.zeros(n)
    rel = 0.0
    tiny = 2.0**e0
    with mpmath.workprec(prec):
        lim = mpmath.mpf(-cutoff)
        for j in np.flatnonzero(allowed):
            dj = mpmath.ldexp(mpmath.mpf(int(d_int[j])), d_exp)
            if dj < lim:
                w[j] = tiny
                continue
            _, man, ex, _ = mpmath.exp(dj)._mpf_
            ints[j] = man << (ex - e0) if ex >= e0 else man >> (e0 - ex)
            r = 1.01 * (rho + 2.0 ** (1 - prec) * abs(float(dj)))
            rel = max(rel, r)
            w[j] = r * math.ldexp(float(ints[j]), e0) * 1.01 + 1.01 * tiny
    return MpWeights(ints, e0, int(sum(ints)), w, rel, 1.01 * tiny)


@dataclass
class MpRow:
    """One attention row computed exactly up to the exp, with its bound."""

    out: np.ndarray  # float64 (Dv,), correctly rounded from the rational below
    exact: list  # Fractions: the rational output before rounding
    err: np.ndarray  # bound on |out - exact attention|
    exact_err: np.ndarray  # bound on |exact - exact attention|
    lse: float
    lse_err: float
    row_scale: np.ndarray  # sum_j p_j |v_j|
    s: np.ndarray  # float64 logits (-inf where masked)
    p: np.ndarray  # float64 probabilities
    pi: float  # |p_hat - p| <= pi * p_hat + tau
    tau: float
    p_mp: np.ndarray | None = None  # mpf probabilities at prec bits
    out_mp: np.ndarray | None = None  # mpf outputs at prec bits
    pi_mp: float = 0.0  # as pi, for p_mp
    err_mp: np.ndarray | None = None  # bound on |out_mp - exact attention|


def mp_row(s_int, s_exp, allowed, v_int, v_exp, vf, prec) -> MpRow:
    """Softmax-weighted average of the rows of V for exact logits
    ``s_int * 2**s_exp`` (entries with ``allowed`` False are masked)."""
    n, dv = vf.shape
    s_float = np.full(n, -np.inf)
    if not allowed.any():
        z = np.zeros(dv)
        with mpmath.workprec(prec):
            zeros = np.array([mpmath.mpf(0)] * max(n, dv), dtype=object)
        return MpRow(z, [Fraction(0)] * dv, z.copy(), z.copy(), -np.inf, 0.0, z.copy(), s_float,
                     np.zeros(n), 0.0, 0.0, zeros[:n].copy(), zeros[:dv].copy(), 0.0, z.copy())
    idx = np.flatnonzero(allowed)
    m_int = max(s_int[j] for j in idx)
    d_int = np.zeros(n, dtype=np.int64).astype(object)
    for j in idx:
        d_int[j] = s_int[j] - m_int
        s_float[j] = ratio_to_float(int(s_int[j]), 1, s_exp)
    wts = mp_exp_weights(d_int, s_exp, allowed, prec)
    ell = wts.total
    ell_f = ratio_to_float(ell, 1, wts.e0)
    F = float(wts.w.sum()) / ell_f * 1.01
    if F >= 0.5:
        raise ArithmeticError("multiple-precision weights too inaccurate; raise prec")
    y = wts.ints @ v_int if v_int.size else np.zeros(dv, dtype=object)
    shift = v_exp  # the 2**e0 of the weights cancels in the ratio
    out = np.array([ratio_to_float(int(y[c]), ell, shift) for c in range(dv)])
    exact = [ratio_fraction(int(y[c]), ell, shift) for c in range(dv)]
    p = np.array([ratio_to_float(int(x), ell, 0) for x in wts.ints])
    G = (wts.w @ np.abs(vf - out)) / ell_f * 1.01
    # |v_j - O| <= |v_j - out| + |out - exact| + |exact - O|, and |out - exact| <= u|out|
    exact_err = CERT_SAFETY * (G + F * U64 * np.abs(out)) / (1 - F)
    err = CERT_SAFETY * (G + 2 * U64 * np.abs(out)) / (1 - F)
    with mpmath.workprec(prec):
        m_mp = mpmath.ldexp(mpmath.mpf(int(m_int)), s_exp)
        log_ell = mpmath.log(mpmath.mpf(ell)) + wts.e0 * mpmath.ln2
        lse_mp = m_mp + log_ell
        lse = float(lse_mp)
        lse_err = CERT_SAFETY * (1.01 * F + 2.0 ** (4 - prec) * (abs(float(m_mp)) + abs(float(log_ell)) + abs(lse))
                            + U64 * abs(lse))
    row_scale = (p @ np.abs(vf)) * (1 + 1e-12)
    pi = 1.01 * (wts.rel + F + U64 + 2.0 ** (2 - prec))
    tau = 1.02 * wts.abs_ / ell_f
    with mpmath.workprec(prec):  # each is one correctly rounded division of exact integers
        ell_mp = mpmath.mpf(ell)
        p_mp = np.array([mpmath.mpf(int(x)) / ell_mp for x in wts.ints], dtype=object)
        out_mp = np.array([mpmath.ldexp(mpmath.mpf(int(y[c])) / ell_mp, v_exp) for c in range(dv)],
                          dtype=object)
    pi_mp = 1.01 * (wts.rel + F + 2.0 ** (3 - prec))
    err_mp = exact_err + CERT_SAFETY * 2.0 ** (3 - prec) * np.abs(out)
    return MpRow(out, exact, err, exact_err, lse, lse_err, row_scale, s_float, p, pi, tau,
                 p_mp, out_mp, pi_mp, err_mp)
