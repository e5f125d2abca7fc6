"""Properties 1 and 5: online softmax, 3-pass softmax, shift invariance."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashcheck.kernels.numpy_attention import softmax_3pass, softmax_online
from flashcheck.kernels.precision import round_to
from flashcheck.properties import strategies as fs
from flashcheck.properties._support import assert_within, models
from flashcheck.verify import oracle
from flashcheck.verify.bounds import softmax_bound

pytestmark = pytest.mark.fuzz


@st.composite
def model_and_logits(draw):
    dtype = draw(fs.dtypes())
    model = draw(models(dtype))
    x = draw(fs.logit_rows(model.logits, max_cols=96))
    return model, x


@given(model_and_logits())
def test_online_and_3pass_match_oracle_and_each_other(args):
    model, x = args
    ref = oracle.softmax(x)
    y3 = softmax_3pass(x, model=model)
    yo = softmax_online(x, model=model)
    b3 = softmax_bound(x, model, online=False)
    bo = softmax_bound(x, model, online=True)
    assert_within(f"softmax_3pass/{model.name}", y3, ref.value, b3 + ref.err_bound)
    assert_within(f"softmax_online/{model.name}", yo, ref.value, bo + ref.err_bound)
    assert_within(f"online-vs-3pass/{model.name}", yo, y3, bo + b3 + 2 * ref.err_bound)


@given(model_and_logits())
def test_rows_sum_to_one_within_bound(args):
    model, x = args
    ref = oracle.softmax(x)
    live = np.isfinite(x).any(-1)
    for fn, online in ((softmax_3pass, False), (softmax_online, True)):
        y = fn(x, model=model)
        b = softmax_bound(x, model, online=online)
        total = np.where(live, y.sum(-1), 1.0)
        # The exact probabilities sum to 1; each computed one is within b of them.
        assert_within(f"sum/{fn.__name__}/{model.name}", total, np.ones_like(total),
                      b.sum(-1) + ref.err_bound.sum(-1))
        assert np.all(y[~live] == 0), "an all -inf row must give zeros"


@given(model_and_logits(), st.sampled_from([-1e4, -300.0, -1.0, 0.5, 37.0, 1e3, 6e4]))
def test_shift_invariance(args, offset):
    """softmax(x + c) = softmax(x) exactly; computed, they differ by the
    rounding of x + c (a known logit perturbation) plus both bounds."""
    model, x = args
    y = round_to(x + offset, model.logits)  # the logits a kernel would hold
    finite = np.isfinite(x)
    with np.errstate(invalid="ignore"):
        delta = np.where(finite, np.abs(y - (x + offset)), 0.0)  # exact: both sums fit in float64
    ref_x = oracle.softmax(x)
    ref_y = oracle.softmax(y)
    # Perturbing logits by at most delta_j moves P_j by P_j (e^{2 max delta} - 1) at most.
    shift = ref_x.value * np.expm1(2 * np.max(delta, axis=-1, keepdims=True, initial=0.0))
    for fn, online in ((softmax_3pass, False), (softmax_online, True)):
        assert_within(
            f"shift/{fn.__name__}/{model.name}", fn(y, model=model), fn(x, model=model),
            softmax_bound(y, model, online=online) + softmax_bound(x, model, online=online)
            + shift + ref_x.err_bound + ref_y.err_bound,
        )
