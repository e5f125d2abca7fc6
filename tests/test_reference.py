"""Where a case's reference and bounds are computed (flashcheck.verify.reference):
tiled over query rows, the oracle and every model's bound equal the untiled ones."""

import numpy as np
import pytest

from flashcheck.kernels.models import get_model
from flashcheck.properties.plans import N_CHOICES, PlanDealer, case_from_plan, feature_values
from flashcheck.verify import oracle
from flashcheck.verify.bounds import attention_bound
from flashcheck.verify.check import judge
from flashcheck.verify.reference import case_scores, oracle_device, reference, row_tiles


def _cases(n, seed):
    rng = np.random.default_rng(seed)
    dealer = PlanDealer(feature_values(magnitudes=tuple(m for m in feature_values()["magnitude"] if m != "nan-inf")),
                        seed=seed)
    for _ in range(n):
        yield case_from_plan(dealer.deal(), rng.integers(0, 2**16, N_CHOICES).tolist(), block_kind="triton")


def test_row_tiles_cover_every_row_once():
    case = next(_cases(1, 3))
    B, H, Nq, _ = case.q.shape
    for cap in (1, 7, case_scores(case) // 3 + 1, case_scores(case)):
        tiles = row_tiles(case, cap)
        assert tiles[0][0] == 0 and tiles[-1][1] == Nq
        assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))
        assert all(B * H * (i1 - i0) * case.k.shape[2] <= max(cap, B * H * case.k.shape[2]) for i0, i1 in tiles)


@pytest.mark.parametrize("seed", [0, 1])
def test_tiled_reference_equals_untiled(seed):
    models = [get_model("fa2", "fp16"), get_model("fp32-ieee", "fp32")]
    for case in _cases(12, seed):
        full = oracle.attention_case(case, keep=True)
        cap = max(1, case_scores(case) // 3)
        ref, bounds = reference(case, models=models, full_max_scores=cap)
        assert ref.s is None and set(bounds) == {m.name for m in models}
        # Row-local, but BLAS may block fewer rows differently: each side is
        # certified by its own bound, and the bounds agree to float64 rounding.
        assert np.all(np.abs(ref.out - full.out) <= ref.err_bound + full.err_bound)
        np.testing.assert_allclose(ref.err_bound, full.err_bound, rtol=1e-12, atol=0)
        np.testing.assert_allclose(ref.lse, full.lse, rtol=1e-14, atol=1e-300)
        assert ref.certified == full.certified and ref.mp_rows == full.mp_rows
        for m in models:
            whole = attention_bound(full, m, attn_mask=case.attn_mask, block_n=case.block_n)
            # the bound is evaluated in float64 (EVAL_MARGIN covers its rounding): sums in another order
            np.testing.assert_allclose(bounds[m.name].out, whole.out, rtol=1e-9, atol=0)
            np.testing.assert_allclose(bounds[m.name].lse, whole.lse, rtol=1e-10, atol=8 * 2.0**-52)
            np.testing.assert_array_equal(bounds[m.name].fallback, whole.fallback)
            assert bounds[m.name].terms.get("fallback_rows") == whole.terms.get("fallback_rows")


def test_judge_uses_precomputed_bounds_without_intermediates():
    model = get_model("fa2", "fp16")
    case = next(_cases(1, 4))
    ref, bounds = reference(case, models=[model], full_max_scores=max(1, case_scores(case) // 2))
    exact = oracle.attention_case(case).out
    j = judge(case, exact.astype(case.q.dtype), model=model, ref=ref, bounds=bounds)
    assert j.verdict == "pass"
    wrong = exact.astype(case.q.dtype)
    allowed = bounds[model.name].out + ref.err_bound
    at = np.unravel_index(np.argmin(allowed), allowed.shape)  # where the bound is tightest
    delta = 4 * allowed[at] + 1.0
    x = float(wrong[at])
    wrong[at] = x + delta if abs(x + delta) < 6e4 else x - delta  # off by far more than allowed
    assert judge(case, wrong, model=model, ref=ref, bounds=bounds).verdict == "fail"


def test_reference_refuses_tiled_gradients_and_bad_caps():
    from flashcheck.properties.grads import with_output_gradient

    case = with_output_gradient(next(_cases(1, 5)), "normal")
    with pytest.raises(ValueError, match="gradients are certified untiled"):
        reference(case, with_grad=True, full_max_scores=1)
    with pytest.raises(ValueError, match="full_max_scores"):
        reference(case, full_max_scores=0)


def test_small_cases_stay_on_the_host():
    case = next(_cases(1, 6))
    assert oracle_device(case, "cpu") is None
    assert oracle_device(case, "cuda") == (None if case_scores(case) < 2**14 else "cuda")
