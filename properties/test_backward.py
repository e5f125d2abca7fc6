"""The backward pass: the NumPy backward emulations (FlashAttention-2, and
torch's math backend for the ``math`` models) against the oracle's
gradients, within the bound derived from the precision model
(verify/grad_bounds.py), and planted bugs that the bound must catch.

The emulation is fed the emulated forward's own output and LSE, as a kernel
feeds its backward, and the bound is told those saved values (the math
backend's backward reads neither: it keeps P).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, event, find, given, settings
from hypothesis import strategies as st

from flashcheck.kernels import numpy_attention as na
from flashcheck.kernels import numpy_backward as nb
from flashcheck.kernels.models import MODELS_FOR_DTYPE, get_model
from flashcheck.kernels.precision import round_to
from flashcheck.properties import strategies as fs
from flashcheck.properties._support import assert_within, models, ratio_of
from flashcheck.verify import oracle
from flashcheck.verify.bounds import attention_bound
from flashcheck.verify.grad_bounds import gradient_bound

pytestmark = pytest.mark.fuzz

SMALL = dict(max_seq=32, max_scores=2**11, max_batch=2, max_heads=4)


def _opts(case):
    return dict(attn_mask=case.attn_mask, is_causal=case.is_causal, scale=case.scale, enable_gqa=case.enable_gqa)


@st.composite
def case_and_model(draw, dtypes=("fp16", "bf16", "fp32"), names=None):
    case = draw(fs.cases(with_grad=True, block_kind="numpy", dtypes=dtypes, **SMALL))
    if names is None:
        model = draw(models(case.dtype))
    else:
        model = get_model(draw(st.sampled_from([n for n in MODELS_FOR_DTYPE[case.dtype] if n in names])), case.dtype)
    return case, model


def _emulate(case, model):
    """(ref, grads, bound): oracle, emulated backward and gradient bound;
    None when the model itself overflows on the case's forward pass."""
    ref = oracle.attention_case(case, keep=True)
    blocks = dict(block_m=case.block_m or 64, block_n=case.block_n or 64)
    try:
        out, lse = na.tiled_attention(case.q, case.k, case.v, **_opts(case), **blocks, model=model,
                                      return_lse=True)
    except ValueError:
        return ref, None, None
    grads = nb.attention_backward(case.q, case.k, case.v, out, lse, case.do, **_opts(case), **blocks, model=model)
    bound = gradient_bound(ref, model, dout=case.do, out_target=out, lse_target=lse, attn_mask=case.attn_mask)
    return ref, grads, bound


def _pairs(ref, grads, bound):
    """(name, got, reference, allowed) per gradient, restricted to the
    elements where the model applies (finite bound)."""
    refs = (ref.dq, ref.dk, ref.dv)
    errs = (ref.dq_err_bound, ref.dk_err_bound, ref.dv_err_bound)
    bounds = (bound.dq, bound.dk, bound.dv)
    for name, got, exact, b, e in zip(("dq", "dk", "dv"), grads, refs, bounds, errs):
        ok = np.isfinite(b)
        yield name, got[ok], exact[ok], b[ok] + e[ok]


@given(case_and_model())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_backward_emulation_within_gradient_bound(args):
    """Soundness: every model, mask, GQA shape and magnitude class."""
    case, model = args
    ref, grads, bound = _emulate(case, model)
    if grads is None:
        assert not np.isfinite(attention_bound(ref, model, attn_mask=case.attn_mask).out).all(), \
            "forward emulation refused a case its model covers"
        event("model overflows in the forward pass")
        return
    if not all(np.isfinite(b).all() for b in (bound.dq, bound.dk, bound.dv)):
        # Only overflow makes the model inapplicable; the forward must see it
        # too, or the gradients' magnitudes must be near the format's range.
        fwd_inf = not np.isfinite(attention_bound(ref, model, attn_mask=case.attn_mask).out).all()
        event("gradient bound infinite: " + ("forward overflows" if fwd_inf else "backward overflows"))
        assert fwd_inf or case.magnitude != "normal", "infinite gradient bound on a normal-magnitude case"
    for name, got, exact, allowed in _pairs(ref, grads, bound):
        assert_within(f"backward/{name}/{model.name}/{case.dtype}", got, exact, allowed, case=case)


# -- planted bugs -----------------------------------------------------------


def _ds_rounded_to_fp16(p, dp, delta, model):
    """Bug: dS rounded to fp16 whatever P's format."""
    return round_to(round_to(p * round_to(dp - delta[..., None], "fp32"), "fp32"), "fp16")


def _ds_rounded_to_bf16(p, dp, delta, model):
    """Bug: dS rounded to bf16 (8 bits) where the fp16 model says fp16 (11):
    a subtle one, that only a sharp bound notices."""
    return round_to(round_to(p * round_to(dp - delta[..., None], "fp32"), "fp32"), "bf16")


def _delta_missing(do, out, model):
    """Bug: the D_i = rowsum(dO * O) term left out of dS."""
    return np.zeros(do.shape[:-1])


def _lse_wrong_base(lse, model):
    """Bug: exp2 applied to logits in base 2 minus the natural-log LSE."""
    return np.where(lse == -np.inf, 0.0, lse)


_stored_probs = nb._stored_probs


def _p_kept_in_input_dtype(prob, model):
    """Bug (math backend): the backward reads P rounded to the input dtype,
    as if the forward had stored it in fp16/bf16 rather than fp32."""
    p, *rest = _stored_probs(prob, model)
    return (round_to(p, model.input), *rest)


def _stored_delta_missing(dp, p, model):
    """Bug (math backend): Delta = rowsum(dP * P) left out of dS."""
    return np.zeros(dp.shape[:-1])


_group_sum = nb._group_sum


def _gqa_sum_after_cast(x, hkv, model):
    """Bug (math backend): each query head's dk, dv cast to the input dtype
    before the GQA group sum, rather than summed in fp32 and cast once."""
    return _group_sum(round_to(x, model.input), hkv, model)


ONLINE = ("fa2", "fa2+gpu", "upcast", "upcast+gpu", "fp32-ieee", "fp32-ieee+gpu", "fp32-tf32", "fp32-tf32+gpu")

PLANTED = {
    "ds-rounded-to-fp16": ("_ds", _ds_rounded_to_fp16, ("fp32",), ("fp32-ieee", "fp32-ieee+gpu")),
    "ds-rounded-to-bf16": ("_ds", _ds_rounded_to_bf16, ("fp16",), ("fa2",)),
    "delta-missing": ("_delta", _delta_missing, ("fp16", "bf16", "fp32"), ONLINE),
    "lse-wrong-base": ("_lse_units", _lse_wrong_base, ("fp16", "bf16"), ("fa2+gpu", "upcast+gpu")),
    "math-p-in-input-dtype": ("_stored_probs", _p_kept_in_input_dtype, ("fp16", "bf16"), ("math", "math+gpu")),
    "math-delta-missing": ("_stored_delta", _stored_delta_missing, ("fp16", "bf16", "fp32"), ("math", "math+gpu")),
    "math-gqa-sum-after-cast": ("_group_sum", _gqa_sum_after_cast, ("fp16", "bf16"), ("math", "math+gpu")),
}


def _exceeds_bound(args) -> bool:
    case, model = args
    ref, grads, bound = _emulate(case, model)
    if grads is None:
        return False
    return any(not ratio_of(got, exact, allowed) <= 1.0 for _, got, exact, allowed in _pairs(ref, grads, bound))


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_backward_bug_exceeds_bound(bug, monkeypatch):
    """Each planted bug gives gradients outside the bound on some generated case."""
    attr, fake, dtypes, names = PLANTED[bug]
    monkeypatch.setattr(nb, attr, fake)
    found = find(case_and_model(dtypes=dtypes, names=names), _exceeds_bound,
                 settings=settings(derandomize=True, max_examples=60, database=None, deadline=None,
                                   suppress_health_check=list(HealthCheck)))
    case, model = found
    assert _exceeds_bound((case, model))
