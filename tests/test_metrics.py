import math

import ml_dtypes
import numpy as np
import pytest
import torch

from flashcheck.kernels.precision import FORMATS, round_to
from flashcheck.verify import oracle
from flashcheck.verify.metrics import (
    ROW_FLOOR_FRACTION,
    Metrics,
    baseline_ratio,
    bits_of_error,
    compare,
    naive_attention,
    ulp_distance,
)


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_ulp_distance_matches_enumeration_across_binades_and_zero(fmt):
    f = FORMATS[fmt]
    # every representable value of the 16-bit format, in order
    bits = np.arange(0, 1 << 16, dtype=np.uint16)
    with np.errstate(invalid="ignore"):  # the NaN patterns
        vals = bits.view(f.storage).astype(np.float64)
    vals = np.unique(vals[np.isfinite(vals)])  # sorted; -0 and +0 merge
    rng = np.random.default_rng(0)
    i = rng.integers(0, len(vals), 400)
    j = np.clip(i + rng.integers(-3000, 3000, 400), 0, len(vals) - 1)
    d = ulp_distance(vals[i], vals[j], fmt)
    assert d.tolist() == np.abs(i - j).tolist()


def test_ulp_distance_special_cases():
    assert ulp_distance(np.array([0.0]), np.array([-0.0]), "fp16").tolist() == [0]
    tiny = 2.0**-24  # fp16's smallest subnormal
    assert ulp_distance(np.array([-tiny]), np.array([tiny]), "fp16").tolist() == [2]
    assert ulp_distance(np.array([1.0]), np.array([1 - 2**-11]), "fp16").tolist() == [1]  # binade edge
    assert ulp_distance(np.array([2.0**-14]), np.array([2.0**-14 - 2**-24]), "fp16").tolist() == [1]
    assert ulp_distance(np.array([65504.0]), np.array([np.inf]), "fp16").tolist() == [1]
    # the reference is rounded correctly first (ties to even)
    assert ulp_distance(np.array([1.0]), np.array([1 + 2**-11]), "fp16").tolist() == [0]
    assert ulp_distance(np.array([1.0]), np.array([1 + 2**-11 + 2**-30]), "fp16").tolist() == [1]
    # fp32 and bf16 across a binade: [1, 2) holds 2**23 and 2**7 values
    assert ulp_distance(np.array([2.0]), np.array([1.0]), "fp32").tolist() == [2**23]
    assert ulp_distance(np.array([-2.0]), np.array([1.0]), "bf16").tolist() == [
        2 * (127 * 128) + 128]  # 0..1 holds 127 binades of 128 values (incl. subnormals)
    assert ulp_distance(np.array([1.0]), np.array([np.nan]), "fp16").tolist() == [-1]


def test_ulp_distance_fp32_against_nextafter():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50).astype(np.float32)
    steps = rng.integers(-40, 40, 50)
    y = x.copy()
    for n in range(50):
        for _ in range(abs(int(steps[n]))):
            y[n] = np.nextafter(y[n], np.float32(np.inf if steps[n] > 0 else -np.inf))
    assert ulp_distance(x, y, "fp32").tolist() == np.abs(steps).tolist()


def test_ulp_distance_rejects_unrepresentable_targets():
    with pytest.raises(ValueError, match="not representable in fp16"):
        ulp_distance(np.array([1 + 2**-20]), np.array([1.0]), "fp16")
    with pytest.raises(ValueError, match="shape"):
        ulp_distance(np.zeros(2), np.zeros(3), "fp16")
    with pytest.raises(ValueError, match="storage"):
        ulp_distance(np.zeros(2), np.zeros(2), "tf32")


def test_bits_of_error():
    assert bits_of_error(np.array([0, 1, 3, 1023])).tolist() == [0.0, 1.0, 2.0, 10.0]
    with pytest.raises(ValueError):
        bits_of_error(np.array([-1]))


def test_compare_hand_made():
    ref = np.array([[1.0, -2.0, 0.0, 4.0]])
    tgt = np.array([[1.0, -2.0 + 2**-9, 2**-20, 4.0 + 2**-8]], dtype=np.float16)
    m = compare(tgt, ref, "fp16")
    err = np.array([0, 2**-9, 2**-20, 2**-8])
    assert m.max_abs_err == 2**-8 and m.max_abs_err_at == (0, 3)
    assert m.normwise_rel_err == pytest.approx(np.linalg.norm(err) / np.linalg.norm(ref))
    assert m.rmse == pytest.approx(math.sqrt((err**2).mean()))
    # ulps: -2 + 2**-9 is one fp16 step (2**-9 at [1, 2) ... at -2 the step is 2**-10 below, 2**-9 above)
    assert m.max_ulp == ulp_distance(tgt, ref, "fp16").max()
    assert m.max_bits == pytest.approx(math.log2(m.max_ulp + 1))
    # relative error: the zero reference is measured against the row floor 4 * 2**-10
    floor = ROW_FLOOR_FRACTION * 4
    assert m.max_rel_err == pytest.approx(max(2**-9 / 2, 2**-20 / floor, 2**-8 / 4))
    fixed = compare(tgt, ref, "fp16", rel_floor=2**-20)
    assert fixed.max_rel_err == pytest.approx(1.0)
    assert m.nan_count == 0 and m.inf_count == 0
    d = m.as_dict()
    assert isinstance(d["max_abs_err_at"], list) and d["dtype"] == "fp16"


def test_compare_counts_nan_and_inf_positions():
    ref = np.zeros((2, 3))
    tgt = np.zeros((2, 3), np.float32)
    tgt[0, 1] = np.nan
    tgt[1, 2] = np.nan
    tgt[1, 0] = np.inf
    m = compare(tgt, ref, "fp32")
    assert (m.nan_count, m.inf_count) == (2, 1)
    assert m.nan_at == ((0, 1), (1, 2)) and m.inf_at == ((1, 0),)
    assert m.max_abs_err == math.inf


def test_compare_with_oracle_result_and_uncertain_rounding():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 6, 8)).astype(np.float16) for _ in range(3))
    r = oracle.attention(q, k, v)
    exact16 = round_to(r.out, "fp16").astype(np.float16)
    m = compare(exact16, r, "fp16")
    assert m.max_ulp == 0 and m.ulp_uncertain == 0 and m.max_ref_err_bound == r.err_bound.max()
    # a reference sitting on a rounding tie with a bound around it cannot decide the rounding
    m2 = compare(np.array([[1.0]], np.float16), np.array([[1 + 2**-11]]), "fp16",
                 ref_err_bound=np.array([[1e-9]]))
    assert m2.ulp_uncertain == 1
    assert isinstance(m2, Metrics)


def test_compare_validation():
    with pytest.raises(ValueError, match="shape"):
        compare(np.zeros((2, 2), np.float16), np.zeros((2, 3)), "fp16")
    with pytest.raises(ValueError, match="reference"):
        compare(np.zeros(2, np.float16), np.array([0.0, np.nan]), "fp16")
    with pytest.raises(ValueError, match="rel_floor"):
        compare(np.zeros(2, np.float16), np.zeros(2), "fp16", rel_floor=-1.0)
    with pytest.raises(ValueError, match="unknown"):
        compare(np.zeros(2, np.float16), np.zeros(2), "fp8")
    with pytest.raises(ValueError, match="ref_err_bound"):
        compare(np.zeros(2, np.float16), np.zeros(2), "fp16", ref_err_bound=np.zeros(3))


def test_baseline_ratio():
    assert baseline_ratio(2e-3, 1e-3) == 2.0
    assert baseline_ratio(0.0, 0.0) == 1.0
    assert baseline_ratio(1e-3, 0.0) == math.inf
    with pytest.raises(ValueError):
        baseline_ratio(-1.0, 1.0)
    with pytest.raises(TypeError):
        baseline_ratio("1", 1.0)


@pytest.mark.parametrize("dtype, lo, hi", [(np.float16, 1e-4, 1e-2), (ml_dtypes.bfloat16, 1e-3, 5e-2),
                                           (np.float32, 1e-8, 1e-6)])
def test_naive_baseline_error_has_the_expected_order(dtype, lo, hi):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 2, 64, 32)).astype(dtype) for _ in range(3))
    r = oracle.attention(q, k, v, is_causal=True)
    naive = naive_attention(q, k, v, is_causal=True)
    fmt = {np.float16: "fp16", np.float32: "fp32"}.get(dtype, "bf16")
    u = FORMATS[fmt].u
    assert np.array_equal(round_to(naive, fmt), naive)  # every value is in the input format
    m = compare(naive, r, fmt)
    assert lo <= m.normwise_rel_err <= hi, m.normwise_rel_err
    assert m.normwise_rel_err >= u / 4  # not exact: every step rounds
    assert m.max_ulp > 0


def test_naive_matches_torch_in_fp32_and_masks():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 2, 5, 8)).astype(np.float32) for _ in range(3))
    mask = rng.random((5, 5)) < 0.8
    mask[:, 0] = True
    naive = naive_attention(q, k, v, attn_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x) for x in (q, k, v)), attn_mask=torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(naive, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mutually exclusive"):
        naive_attention(q, k, v, attn_mask=mask, is_causal=True)
