"""Judging one case: target output -> oracle -> metrics and bound -> verdict.

`judge` compares an output with the certified oracle under a precision
model's bound; `run_case` calls a target first and turns whatever it does
(raise, return garbage, return NaN) into a verdict with a reason.

The pass rule: every output element satisfies
|O_target - O_oracle| <= bound(model) + the oracle's own certified error,
the LSE likewise when the target returns one, and no NaN or Inf appears
that the exact answer does not have. Inputs with NaN or Inf are judged on
semantics instead: rows that read a non-finite value must be non-finite,
rows whose query and every key and value are finite must be finite.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from flashcheck.kernels.precision import PrecisionModel, format_of, to_float64
from flashcheck.properties.case import Case
from flashcheck.verify import metrics as _metrics
from flashcheck.verify import oracle as _oracle
from flashcheck.verify.bounds import Bound, attention_bound
from flashcheck.verify.explain import (
    case_features,
    diagnose,
    diagnose_gradient,
    key_features,
    row_features,
    trigger,
    visibility,
    zero_nonfinite,
)
from flashcheck.verify.grad_bounds import GradBound, gradient_bound
from flashcheck.verify.isolation import classify_exception, fault_kind
from flashcheck.verify.profile import timed
from flashcheck.verify.reference import case_scores, reference
from flashcheck.verify.signatures import signature_key, symptom_for

__all__ = ["GRADS", "CaseResult", "GradJudgement", "Judgement", "baseline_error", "error_ratio", "judge",
           "judge_gradients", "run_case"]


@dataclass
class Judgement:
    verdict: str  # "pass" or "fail"
    reason: str | None
    ratio: float  # max over elements of |err| / (bound + oracle error)
    lse_ratio: float | None
    metrics: _metrics.Metrics | None
    bound: Bound | None
    worst_at: tuple = ()
    kind: str | None = None  # the failure class (`flashcheck.verify.signatures.FAILURE_CLASSES`) of a failure
    allowed: float | None = None  # bound + oracle error at ``worst_at``


@dataclass
class CaseResult:
    """One report row: a case, a target, and what happened."""

    case: Case
    target: str
    model: str
    verdict: str  # "pass", "fail" or "unsupported"
    reason: str | None = None
    ratio: float | None = None
    lse_ratio: float | None = None
    baseline_ratio: float | None = None
    metrics: dict = field(default_factory=dict)
    bound_max: float | None = None
    oracle_mp_rows: int | None = None
    seconds: float = 0.0
    failure: dict = field(default_factory=dict)  # class, symptom, trigger, features, signature, at, allowed
    grad: dict = field(default_factory=dict)  # --grad: verdict, reason, per-gradient ratios and errors

    def row(self) -> dict:
        failure = {f"failure_{k}" if k in ("class", "at") else k: v for k, v in self.failure.items()}
        return {
            **self.case.describe(),
            "target": self.target,
            "model": self.model,
            "verdict": self.verdict,
            "reason": self.reason,
            "ratio": self.ratio,
            "lse_ratio": self.lse_ratio,
            "baseline_ratio": self.baseline_ratio,
            "bound_max": self.bound_max,
            "oracle_mp_rows": self.oracle_mp_rows,
            "seconds": round(self.seconds, 4),
            **failure,
            **{f"grad_{k}" if k in ("verdict", "reason", "ratio", "judged") else k: v for k, v in self.grad.items()},
            **{f"m_{k}": v for k, v in self.metrics.items()},
        }


def _ratio(err: np.ndarray, allowed: np.ndarray) -> tuple[float, tuple]:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(allowed > 0, err / allowed, np.where(err > 0, np.inf, 0.0))
    if r.size == 0:
        return 0.0, ()
    idx = np.unravel_index(int(np.argmax(r)), r.shape)
    return float(r[idx]), tuple(int(i) for i in idx)


def error_ratio(got, ref, allowed) -> float:
    """max over elements of |got - ref| / allowed, computed in float64.

    An element with allowed == 0 counts 0 when exact and inf otherwise; a
    NaN error counts inf; no elements give 0. Inputs: NumPy arrays or torch
    tensors of any float format, broadcastable together.
    """
    got, ref, allowed = (to_float64(a) for a in (got, ref, allowed))
    err = np.abs(got - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(allowed > 0, err / allowed, np.where(err > 0, np.inf, 0.0))
    r = np.where(np.isnan(err), np.inf, r)
    return float(np.max(r, initial=0.0))


@dataclass
class GradJudgement:
    verdict: str  # "pass" or "fail"
    reason: str | None
    ratios: dict  # "dq", "dk", "dv" -> max |err| / (bound + oracle error) where the bound is finite
    max_errs: dict  # "dq", "dk", "dv" -> max |err| where the bound is finite
    bound: GradBound | None
    kind: str | None = None  # grad-wrong, grad-non-finite, grad-shape of a failure
    grad: str | None = None  # which gradient failed first
    worst_at: tuple = ()  # index of the failing element in that gradient
    allowed: float | None = None  # bound + oracle error there
    judged: dict = field(default_factory=dict)  # "dq", ... -> share of elements with a finite bound


GRADS = ("dq", "dk", "dv")


def judge_gradients(case: Case, dq, dk, dv, *, model: PrecisionModel, out, lse=None, ref=None,
                    bounds: dict | None = None) -> GradJudgement:
    """Verdict on a target's gradients for ``case`` under ``model``.

    ``case.do`` is the output gradient the target was given; ``out`` (and
    ``lse``, natural log, when the target returns it) are what the target's
    forward saved (its backward reads them, so the bound is taken around
    them; without ``lse`` the forward bound stands for its error). The pass
    rule, per gradient: every element where the bound is finite is finite
    and within `flashcheck.verify.grad_bounds.gradient_bound` plus the
    oracle's certified error. Rows with no visible key have exact gradient 0
    and a bound of a few subnormal spacings: they must come out zero. Where
    the bound is infinite the model does not apply (overflow): nothing is
    asserted there, and ``judged`` says how much was. ``ref``: the oracle's
    result with gradients and intermediates (``keep=True``), to save
    recomputing it. ``bounds``: a dict kept for one case (and one ``ref``):
    targets whose forward saved the same output and LSE share one bound.
    Finite inputs only (the gradient semantics of NaN/Inf are not judged).
    """
    if not isinstance(case, Case):
        raise TypeError(f"judge_gradients needs a flashcheck.properties.case.Case, got {type(case).__name__}")
    if not isinstance(model, PrecisionModel):
        raise TypeError(f"model must be a PrecisionModel, got {type(model).__name__}")
    if case.do is None:
        raise ValueError("judge_gradients needs case.do, the output gradient")
    if _nonfinite_inputs(case):
        raise ValueError("judge_gradients is defined for finite inputs only")
    if ref is None or ref.s is None or getattr(ref, "dq", None) is None:
        ref = _oracle.attention_case(case, keep=True, with_grad=True)
    o = to_float64(out)
    if o.shape != ref.out.shape or not np.isfinite(o).all():
        # The backward's inputs are already wrong: the forward's verdict says so; bound around the oracle's.
        o = None
    lt = None if lse is None or o is None else to_float64(lse)
    if lt is not None and (lt.shape != ref.lse.shape or np.isnan(lt).any()):
        lt = None
    key = ("grad", model, _digest(o), _digest(lt))
    bound = None if bounds is None else bounds.get(key)
    if bound is None:
        # Where an intermediate can overflow the bound is inf or NaN: "model not applicable", not judged.
        with np.errstate(invalid="ignore", over="ignore"), timed("bound"):
            bound = gradient_bound(ref, model, dout=case.do, out_target=o, lse_target=lt, attn_mask=case.attn_mask)
        if bounds is not None:
            bounds[key] = bound
    j = GradJudgement("pass", None, {}, {}, bound)
    for name, got in zip(GRADS, (dq, dk, dv)):
        g, exact = to_float64(got), getattr(ref, name)
        b, e = getattr(bound, name), getattr(ref, name + "_err_bound")
        if g.shape != exact.shape:
            j.ratios[name], j.max_errs[name] = np.inf, np.inf
            _grad_failure(j, "grad-shape", name, f"{name} shape {g.shape}, expected {exact.shape}")
            continue
        fin = np.isfinite(b)
        j.judged[name] = float(fin.mean()) if fin.size else 1.0
        allowed = np.where(fin, b + e, np.inf)
        with np.errstate(invalid="ignore"):
            err = np.where(fin, np.abs(g - exact), 0.0)
        bad = fin & ~np.isfinite(g)
        j.max_errs[name] = float(np.max(np.where(bad, 0.0, err), initial=0.0))
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            j.ratios[name] = np.inf
            _grad_failure(j, "grad-non-finite", name,
                          f"{name}: non-finite gradient {g[at]} at {at} where the model has no overflow", at)
            continue
        ratio, at = _ratio(err, allowed)
        j.ratios[name] = ratio
        if ratio > 1:
            _grad_failure(j, "grad-wrong", name, f"{name} error {err[at]:.3g} exceeds bound {b[at]:.3g} at {at} "
                          f"(ratio {ratio:.3g}, model {model.name})", at, float(allowed[at]))
    return j


def _digest(x) -> str | None:
    if x is None:
        return None
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() + str(x.shape)


def _grad_failure(j: GradJudgement, kind, name, reason, at=(), allowed=None) -> None:
    if j.verdict == "fail":
        return  # the first failing gradient names the failure
    j.verdict, j.reason, j.kind, j.grad, j.worst_at, j.allowed = "fail", reason, kind, name, at, allowed


def _nonfinite_inputs(case: Case) -> bool:
    return not all(np.isfinite(to_float64(t)).all() for t in (case.q, case.k, case.v))


def _bound(case: Case, ref, model: PrecisionModel, bounds: dict | None) -> Bound:
    """The case's bound under ``model``, from ``bounds`` (a per-case cache by
    model name, shared by the targets of one case) when it is there."""
    if bounds is not None and model.name in bounds:
        return bounds[model.name]
    with timed("bound"):
        bound = attention_bound(ref, model, attn_mask=case.attn_mask, block_n=case.block_n)
    if bounds is not None:
        bounds[model.name] = bound
    return bound


def judge(case: Case, out, lse=None, *, model: PrecisionModel, ref=None, bounds: dict | None = None) -> Judgement:
    """Verdict on ``out`` (and ``lse``) for ``case`` under ``model``.
    ``bounds``: a dict kept for one case (and one ``ref``) across targets."""
    if not isinstance(case, Case):
        raise TypeError(f"judge needs a flashcheck.properties.case.Case, got {type(case).__name__}")
    if not isinstance(model, PrecisionModel):
        raise TypeError(f"model must be a PrecisionModel, got {type(model).__name__}")
    if _nonfinite_inputs(case):
        return _judge_nonfinite(case, out, model)
    if ref is None or (ref.s is None and (bounds is None or model.name not in bounds)):
        ref, pre = reference(case, models=[model])
        bounds = {**(bounds or {}), **pre}
    o = to_float64(out)
    if o.shape != ref.out.shape:
        return Judgement("fail", f"output shape {o.shape}, expected {ref.out.shape}", np.inf, None, None, None,
                         kind="shape")
    m = _metrics.compare(o, ref, case.dtype)
    bound = _bound(case, ref, model, bounds)
    bad = ~np.isfinite(o)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        return Judgement("fail", f"non-finite output {o[idx]} at {idx} from finite inputs", np.inf, None, m, bound, idx,
                         kind="non-finite")
    err = np.abs(o - ref.out)
    ratio, at = _ratio(err, bound.out + ref.err_bound)
    lse_ratio = None
    reason = kind = None
    allowed = float(bound.out[at] + ref.err_bound[at]) if at else None
    if ratio > 1:
        reason = (f"error {err[at]:.3g} exceeds bound {bound.out[at]:.3g} at {at} "
                  f"(ratio {ratio:.3g}, model {model.name})")
        kind = "wrong"
    if lse is not None:
        lt = to_float64(lse)
        if lt.shape != ref.lse.shape:
            reason, kind = (reason, kind) if reason else (f"lse shape {lt.shape}, expected {ref.lse.shape}", "shape")
            lse_ratio = np.inf
        else:
            both_inf = np.isneginf(lt) & np.isneginf(ref.lse)
            with np.errstate(invalid="ignore"):
                lerr = np.where(both_inf, 0.0, np.abs(lt - ref.lse))
            lerr = np.where(np.isnan(lerr), np.inf, lerr)
            lse_ratio, lat = _ratio(lerr, bound.lse + ref.lse_err_bound)
            if lse_ratio > 1 and reason is None:
                reason = (f"lse error {lerr[lat]:.3g} exceeds bound {bound.lse[lat]:.3g} at {lat} "
                          f"(ratio {lse_ratio:.3g})")
                kind, at = "lse", lat
    verdict = "fail" if reason else "pass"
    return Judgement(verdict, reason, ratio, lse_ratio, m, bound, at, kind=kind, allowed=allowed)


def _judge_nonfinite(case: Case, out, model: PrecisionModel) -> Judgement:
    """Semantics: rows that read a NaN must show it; rows whose inputs are all
    finite must be finite and, since they cannot see the non-finite values,
    match the oracle of the case with those values zeroed, within the bound."""
    q, k, v = (to_float64(t) for t in (case.q, case.k, case.v))
    B, H, Nq, _ = q.shape
    group = H // k.shape[1]
    # A NaN poisons every row that reads it (NaN * 0 is NaN); an infinity need
    # not (a -inf logit acts as a mask), so only NaN is required to show.
    kv_nan = np.repeat(np.isnan(k).any(-1) | np.isnan(v).any(-1), group, axis=1)  # (B, H, Nk)
    kv_bad = np.repeat(~(np.isfinite(k).all(-1) & np.isfinite(v).all(-1)), group, axis=1)
    q_nan = np.isnan(q).any(-1)  # (B, H, Nq)
    q_bad = ~np.isfinite(q).all(-1)
    visible = visibility(case)
    # A fully masked row reads nothing, not even its query: its output is 0.
    must_be_bad = (q_nan & visible.any(-1)) | (visible & kv_nan[:, :, None, :]).any(-1)
    may_be_clean = ~q_bad & ~kv_bad.any(-1)[:, :, None]
    o = to_float64(out)
    if o.shape[:3] != (B, H, Nq):
        return Judgement("fail", f"output shape {o.shape} does not match q's {q.shape[:3]}", np.inf, None, None, None,
                         kind="shape")
    row_bad = ~np.isfinite(o).all(-1)
    silent = must_be_bad & ~row_bad
    if silent.any():
        idx = tuple(int(i) for i in np.argwhere(silent)[0])
        return Judgement("fail", f"row {idx} reads a NaN input but its output is finite", np.inf, None, None,
                         None, idx, kind="nan-dropped")
    leak = may_be_clean & row_bad
    if leak.any():
        idx = tuple(int(i) for i in np.argwhere(leak)[0])
        return Judgement("fail", f"row {idx} has only finite inputs but a non-finite output", np.inf, None, None,
                         None, idx, kind="nan-leak")
    if not may_be_clean.any():
        return Judgement("pass", None, 0.0, None, None, None)
    zeroed = zero_nonfinite(case)
    ref = _oracle.attention_case(zeroed, keep=True, with_grad=False)
    bound = attention_bound(ref, model, attn_mask=case.attn_mask, block_n=case.block_n)
    clean = np.broadcast_to(may_be_clean[..., None], o.shape)
    err = np.where(clean, np.abs(o - ref.out), 0.0)
    ratio, at = _ratio(err, bound.out + ref.err_bound)
    allowed = float(bound.out[at] + ref.err_bound[at]) if at else None
    if ratio > 1:
        return Judgement("fail", f"error {err[at]:.3g} exceeds bound {bound.out[at]:.3g} at {at} on a row with "
                         f"finite inputs (ratio {ratio:.3g})", ratio, None, None, bound, at, kind="wrong",
                         allowed=allowed)
    return Judgement("pass", None, ratio, None, None, bound, at, allowed=allowed)


def run_case(case: Case, target, *, device: str = "cpu", ref=None, baseline: bool = True,
             baseline_err: float | None = None, bounds: dict | None = None) -> CaseResult:
    """Run ``target`` (a `flashcheck.verify.targets.Target`) on ``case`` and judge it.
    ``baseline_err`` (from `baseline_error`) saves recomputing the naive
    baseline for each target of the same case; ``bounds`` (an empty dict per
    case) does the same for the error bound of each precision model.

    A failing result carries ``failure``: its class, symptom, trigger and
    features (`flashcheck.verify.explain`), its signature, the failing index
    and the error allowed there; the reason names the features."""
    model = target.model_for(case.dtype, device)
    start = time.perf_counter()
    result = CaseResult(case=case, target=target.name, model=model.name, verdict="fail")
    try:
        with timed("target"):
            produced = target.run(case, device)
    except NotImplementedError as exc:
        result.verdict, result.reason = "unsupported", str(exc) or "not implemented"
        result.seconds = time.perf_counter() - start
        return result
    except Exception as exc:  # a target that raises is a failing case
        result.seconds = time.perf_counter() - start
        if getattr(exc, "fresh_output", None) is None:
            _describe_exception(result, exc, device)
            return result
        # A fault in a warm worker that a fresh worker did not repeat: judge what the fresh one returned.
        produced, warm_fault = exc.fresh_output, exc
    else:
        result.seconds = time.perf_counter() - start
        warm_fault = None
    out = produced.out
    wrong = _wrong_dtype(out, case, "output")
    if wrong:
        result.reason = wrong
        _describe_failure(result, "dtype")
        return result
    if ref is None and not _nonfinite_inputs(case):
        ref, pre = reference(case, device=device, models=[model])
        bounds = {**(bounds if bounds is not None else {}), **pre}
    j = judge(case, out, produced.lse, model=model, ref=ref, bounds=bounds if ref is not None else None)
    result.verdict, result.reason = j.verdict, j.reason
    result.ratio, result.lse_ratio = j.ratio, j.lse_ratio
    if j.metrics is not None:
        result.metrics = j.metrics.as_dict()
    if j.bound is not None:
        result.bound_max = float(np.max(j.bound.out, initial=0.0))
    if ref is not None:
        result.oracle_mp_rows = ref.mp_rows
    if j.verdict == "fail":
        at, diagnosis = j.worst_at, None
        if j.kind in ("wrong", "non-finite", "nan-dropped", "nan-leak"):
            diagnosis = diagnose(case, out, at, allowed=j.allowed or 0.0)
        _describe_failure(result, j.kind or "wrong", at=at, allowed=j.allowed if j.kind == "wrong" else None,
                          diagnosis=diagnosis)
        if j.kind == "wrong" and j.bound is not None and ref is not None:
            result.failure["allowed_max"] = float(np.max(j.bound.out + ref.err_bound, initial=0.0))
    if warm_fault is not None:
        if j.verdict == "fail":
            result.reason = f"{result.reason} (from a fresh process, after: {warm_fault})"
        else:
            result.verdict, result.reason = "fail", f"{warm_fault}; the fresh output passes (ratio {j.ratio:.3g})"
            name = _exception_symptom(warm_fault.kind, warm_fault.what)
            _describe_failure(result, warm_fault.kind, symptom=f"{name}, not reproduced in a fresh process")
    if case.do is not None:
        _judge_backward(result, case, produced, model, ref, forward_failed=j.verdict == "fail", bounds=bounds)
    if (baseline and ref is not None and j.metrics is not None and np.isfinite(j.metrics.max_abs_err)
            and (baseline_err is not None or case_scores(case) <= BASELINE_MAX_SCORES)):
        base_err = baseline_error(case, ref) if baseline_err is None else baseline_err
        if np.isfinite(base_err):  # the naive baseline itself may overflow or give NaN
            result.baseline_ratio = _metrics.baseline_ratio(j.metrics.max_abs_err, base_err)
    return result


def _wrong_dtype(t, case: Case, name: str) -> str | None:
    """Why ``t`` (a target's output or gradient) is not in the case's input
    dtype, or None when it is."""
    expected = format_of(case.q.dtype)
    try:
        got = format_of(t)
    except (TypeError, ValueError):
        got = None
    if got is expected:
        return None
    return f"{name} dtype {getattr(t, 'dtype', type(t))}, expected {expected.name}"


def _judge_backward(result: CaseResult, case: Case, produced, model: PrecisionModel, ref,
                    forward_failed: bool, bounds: dict | None = None) -> None:
    """Judge the gradients a target returned (``result.grad``); a gradient
    failure fails the row when its forward passed (a failing forward names
    the row's failure; its gradients are still judged and recorded)."""
    grad = result.grad
    if produced.grad_error is not None:
        status, message = produced.grad_error
        if status == "unsupported":
            grad.update(verdict="unsupported", reason=message)
            return
        grad.update(verdict="fail", reason=message)
        if not forward_failed:
            result.verdict, result.reason = "fail", f"gradient: {message}"
            symptom = symptom_for("grad-raised", message=message.removeprefix("backward raised "))
            _describe_failure(result, "grad-raised", symptom=symptom)
        return
    if produced.grads is None:
        grad.update(verdict="unsupported", reason="the target returned no gradients")
        return
    if ref is None:
        grad.update(verdict="not judged", reason="NaN/Inf inputs: gradient semantics are not judged")
        return
    for name, g in zip(GRADS, produced.grads):
        reason = _wrong_dtype(g, case, name)
        if reason:
            grad.update(verdict="fail", reason=reason)
            if not forward_failed:
                result.verdict, result.reason = "fail", f"gradient: {reason}"
                _describe_failure(result, "grad-dtype")
            return
    if ref.dq is None:
        ref = _oracle.attention_case(case, keep=True, with_grad=True)
    j = judge_gradients(case, *produced.grads, model=model, out=produced.out, lse=produced.lse, ref=ref,
                        bounds=bounds if ref is not None else None)
    grad.update(verdict=j.verdict, reason=j.reason,
                ratio=max((r for r in j.ratios.values()), default=None),
                judged=round(min(j.judged.values(), default=1.0), 4))
    for name in GRADS:
        grad[f"{name}_ratio"] = j.ratios.get(name)
        grad[f"{name}_max_err"] = j.max_errs.get(name)
        b = getattr(j.bound, name, None)
        grad[f"{name}_bound_max"] = float(np.max(b[np.isfinite(b)], initial=0.0)) if b is not None else None
    if j.verdict == "pass" or forward_failed:
        return
    result.verdict, result.reason = "fail", f"gradient: {j.reason}"
    g = dict(zip(GRADS, produced.grads))[j.grad]
    diagnosis = diagnose_gradient(j.grad, g, getattr(ref, j.grad), j.worst_at) if j.worst_at else None
    symptom = diagnosis or f"{j.grad} {symptom_for(j.kind)}"
    # dq's index names a query row; dk's and dv's a key row.
    _describe_failure(result, j.kind, at=j.worst_at, allowed=j.allowed, diagnosis=diagnosis, symptom=symptom,
                      keys=j.grad != "dq")
    result.failure["gradient"] = j.grad
    if j.kind == "grad-wrong":
        b, e = getattr(j.bound, j.grad), getattr(ref, j.grad + "_err_bound")
        result.failure["allowed_max"] = float(np.max((b + e)[np.isfinite(b)], initial=0.0))


def _describe_exception(result: CaseResult, exc: Exception, device: str) -> None:
    """A target that raised, faulted, crashed or hung: the reason and the failure."""
    kind = getattr(exc, "kind", None)  # a TargetCrash from the isolated worker knows its kind
    if kind is None:
        kind, message = classify_exception(exc, device), f"{type(exc).__name__}: {exc}"
        result.reason = f"raised {message}"
    else:
        result.reason, message = str(exc), exc.what
    result.metrics = {"traceback": traceback.format_exc(limit=3)[-800:]}
    _describe_failure(result, kind, symptom=_exception_symptom(kind, message))


def _exception_symptom(kind: str, message: str) -> str:
    """The symptom of a target that raised, faulted, crashed or hung: a fault's
    canonical name, else the message (less the isolated worker's prefix)."""
    if kind == "fault" and (name := fault_kind(message)):
        return name
    return symptom_for(kind, message=message.removeprefix("target raised "))


def _describe_failure(result: CaseResult, kind: str, *, at=(), allowed=None, diagnosis=None, symptom=None,
                      keys: bool = False) -> None:
    """Fill ``result.failure`` and append to the reason what is special about
    the failing row (a key row when ``keys``: dK, dV) and what the wrong
    value looks like."""
    case = result.case
    rows = (key_features(case, at) if keys else row_features(case, at)) if at else []
    features = rows + case_features(case)
    symptom = symptom or symptom_for(kind, diagnosis=diagnosis)
    why = trigger(rows)
    result.failure = {
        "class": kind, "symptom": symptom, "trigger": why, "features": features,
        "signature": signature_key(result.target, kind, symptom, why),
        "at": [int(i) for i in at] if at else None, "allowed": allowed,
    }
    notes = []
    if rows:
        notes.append(f"{'key' if keys else 'row'} {tuple(int(i) for i in at[:3])}: {', '.join(rows)}")
    if diagnosis:
        notes.append(diagnosis)
    if notes and result.reason:
        result.reason = f"{result.reason}; {'; '.join(notes)}"


#: Largest case whose naive same-precision baseline is computed (on the
#: host, in NumPy: a larger one would cost more than judging the case).
BASELINE_MAX_SCORES = 2**20


def baseline_error(case: Case, ref) -> float:
    """Max error of a same-precision naive attention on the case (the
    denominator of the baseline ratio); computed once per case."""
    naive = _metrics.naive_attention(
        case.q, case.k, case.v, attn_mask=case.attn_mask, is_causal=case.is_causal, scale=case.scale,
        enable_gqa=case.enable_gqa,
    )
    return float(np.max(np.abs(to_float64(naive) - ref.out), initial=0.0))
