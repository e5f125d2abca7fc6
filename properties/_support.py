"""Shared checks for the property tests.

`assert_within` is the one comparison every property makes: elementwise
|got - ref| <= allowed, where ``allowed`` is a derived bound (plus the
oracle's own certified error). It feeds the worst ratio to
`hypothesis.target`, so the search climbs toward failures, and on failure
saves the case (when given) as a replayable ``.npz`` under
``reports/failures/`` (``python -m flashcheck replay FILE``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from hypothesis import event, target
from hypothesis import strategies as st

from flashcheck.kernels.models import MODELS_FOR_DTYPE, get_model

FAILURE_DIR = Path(os.environ.get("FLASHCHECK_FAILURE_DIR", "reports/failures"))


def models(dtype: str, *, online_only: bool = False):
    """Every named precision model for inputs of ``dtype``; with
    ``online_only``, those with an online softmax (the ones that have
    partial states to split and merge: not ``math``)."""
    names = [n for n in MODELS_FOR_DTYPE[dtype] if not online_only or get_model(n, dtype).softmax == "online"]
    return st.sampled_from(names).map(lambda name: get_model(name, dtype))


def ratio_of(got, ref, allowed) -> float:
    got, ref, allowed = (np.asarray(a, dtype=np.float64) for a in (got, ref, allowed))
    err = np.abs(got - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(allowed > 0, err / allowed, np.where(err > 0, np.inf, 0.0))
    r = np.where(np.isnan(err), np.inf, r)
    return float(np.max(r, initial=0.0))


def save_failure(case, label: str) -> Path | None:
    if case is None:
        return None
    FAILURE_DIR.mkdir(parents=True, exist_ok=True)
    path = FAILURE_DIR / f"{label.replace(' ', '_').replace('/', '_')}-{case.case_id}.npz"
    case.save(path)
    return path


def assert_within(label: str, got, ref, allowed, *, case=None) -> float:
    """Assert |got - ref| <= allowed elementwise; report the ratio to Hypothesis."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise AssertionError(f"{label}: shape {got.shape} != reference shape {ref.shape}")
    ratio = ratio_of(got, ref, allowed)
    if np.isfinite(ratio):
        target(ratio, label=label)
    if not ratio <= 1.0:
        err = np.abs(got - ref)
        with np.errstate(invalid="ignore", divide="ignore"):
            at = np.unravel_index(int(np.nanargmax(np.where(np.isnan(err), np.inf, err / np.maximum(allowed, 1e-300)))),
                                  got.shape)
        saved = save_failure(case, label)
        raise AssertionError(
            f"{label}: error {err[at]:.3g} exceeds bound {np.asarray(allowed)[at]:.3g} at {tuple(map(int, at))} "
            f"(ratio {ratio:.3g}; got {got[at]!r}, reference {ref[at]!r})"
            + (f"; case saved to {saved}" if saved else "")
        )
    if ratio > 0.1:
        event("error/bound > 0.1")
    return ratio
