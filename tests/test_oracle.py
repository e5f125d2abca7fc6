"""The oracle against independent references: a plain mpmath evaluation at
300 bits, its own exact-integer path at 256 bits (crosscheck), and torch's
scaled_dot_product_attention in float64 for the semantics."""

import math

import ml_dtypes
import mpmath
import numpy as np
import pytest
import torch

from flashcheck.properties.case import Case
from flashcheck.verify import oracle

RNG_SEED = 1234


def rand(shape, dtype=np.float16, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(dtype)


def naive_mp(q, k, v, *, scale, allowed=None, add=None, prec=300):
    """Textbook attention in mpmath (fdot / fsum), one row at a time."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, H, Nq, D = q.shape
    G = H // k.shape[1]
    if allowed is not None:
        allowed = np.broadcast_to(allowed, (B, H, Nq, k.shape[2]))
    out = np.empty((B, H, Nq, v.shape[3]), dtype=object)
    lse = np.empty((B, H, Nq), dtype=object)
    with mpmath.workprec(prec):
        for b in range(B):
            for h in range(H):
                kk, vv = k[b, h // G], v[b, h // G]
                for i in range(Nq):
                    s = []
                    for j in range(kk.shape[0]):
                        if allowed is not None and not allowed[b, h, i, j]:
                            continue
                        x = mpmath.mpf(scale) * mpmath.fdot(q[b, h, i].tolist(), kk[j].tolist())
                        if add is not None:
                            x += mpmath.mpf(float(add[b, h, i, j]))
                        s.append((j, x))
                    if not s:
                        out[b, h, i] = [mpmath.mpf(0)] * vv.shape[1]
                        lse[b, h, i] = -mpmath.inf
                        continue
                    m = max(x for _, x in s)
                    e = [(j, mpmath.exp(x - m)) for j, x in s]
                    ell = mpmath.fsum(w for _, w in e)
                    out[b, h, i] = [mpmath.fsum(w * mpmath.mpf(float(vv[j, c])) for j, w in e) / ell
                                    for c in range(vv.shape[1])]
                    lse[b, h, i] = m + mpmath.log(ell)
    return out, lse


def assert_within_bound(r, ref_out, ref_lse):
    """|r.out - ref| <= r.err_bound (ref at 300 bits: its own error is ~1e-80)."""
    with mpmath.workprec(300):
        diff = np.vectorize(lambda a, b: float(abs(mpmath.mpf(float(a)) - b)))(r.out, ref_out)
        assert (diff <= r.err_bound + 1e-70).all(), (diff - r.err_bound).max()
        fin = np.isfinite(r.lse)
        assert (np.isinf(r.lse) == np.vectorize(lambda x: x == -mpmath.inf)(ref_lse)).all()
        dl = np.vectorize(lambda a, b: float(abs(mpmath.mpf(float(a)) - b)))(r.lse[fin], ref_lse[fin])
        assert (dl <= r.lse_err_bound[fin] + 1e-70).all()


# -- agreement within the certified bound -------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("mode", ["auto", "mpmath"])
def test_matches_plain_mpmath_within_bound(dtype, mode):
    q, k, v = (rand((1, 2, 5, 6), dtype, seed=s) for s in (1, 2, 3))
    r = oracle.attention(q, k, v, is_causal=True, mode=mode)
    ref_out, ref_lse = naive_mp(q, k, v, scale=1 / math.sqrt(6), allowed=np.tri(5, 5, dtype=bool)[None, None])
    assert_within_bound(r, ref_out, ref_lse)
    assert r.certified
    # the bound is informative, not vacuous: far below fp32's resolution
    assert (r.err_bound <= 1e-3 * 2**-24 * np.maximum(np.abs(r.out), r.row_scale)).all()


def test_plain_mpmath_with_additive_mask_and_gqa():
    q = rand((1, 4, 4, 3), np.float32, seed=4)
    k, v = rand((1, 2, 6, 3), np.float32, seed=5), rand((1, 2, 6, 5), np.float32, seed=6)
    add = rand((1, 1, 4, 6), np.float32, scale=3.0, seed=7)
    add[0, 0, 1, 2] = -np.inf
    r = oracle.attention(q, k, v, attn_mask=add, enable_gqa=True, scale=0.7)
    allowed = np.broadcast_to(add != -np.inf, (1, 4, 4, 6))
    ref_out, ref_lse = naive_mp(q, k, v, scale=0.7, allowed=allowed,
                                add=np.broadcast_to(np.where(allowed, add, 0), (1, 4, 4, 6)))
    assert_within_bound(r, ref_out, ref_lse)


def adversarial_cases():
    rng = np.random.default_rng(RNG_SEED)
    cases = {}
    # huge logits |s| ~ 1e4
    cases["huge_logits"] = dict(q=(rng.standard_normal((1, 1, 8, 8)) * 60).astype(np.float32),
                                k=(rng.standard_normal((1, 1, 12, 8)) * 60).astype(np.float32),
                                v=rng.standard_normal((1, 1, 12, 4)).astype(np.float32))
    # cancellation in V: +-1e4 and an output near 0 (uniform attention)
    v = np.where(np.arange(12)[:, None] % 2 == 0, 1e4, -1e4) + rng.standard_normal((12, 4))
    cases["v_cancellation"] = dict(q=np.zeros((1, 1, 4, 8), np.float16), k=rand((1, 1, 12, 8), seed=8),
                                   v=v.astype(np.float16)[None, None])
    # FlashAttention-3's outliers: N(0,1) + N(0,100) * Bernoulli(0.001)
    def outliers(shape):
        return (rng.standard_normal(shape) + rng.standard_normal(shape) * 10
                * (rng.random(shape) < 0.001)).astype(np.float16)
    cases["fa3_outliers"] = dict(q=outliers((1, 2, 32, 32)), k=outliers((1, 2, 32, 32)),
                                 v=outliers((1, 2, 32, 32)))
    cases["uniform"] = dict(q=np.zeros((1, 1, 3, 4), np.float16), k=rand((1, 1, 7, 4), seed=9),
                            v=rand((1, 1, 7, 4), seed=10))
    eye = np.eye(8, dtype=np.float16)[None, None] * 200
    cases["one_hot"] = dict(q=eye, k=eye, v=rand((1, 1, 8, 3), seed=11))
    cases["very_negative"] = dict(q=rand((1, 1, 4, 4), seed=12), k=rand((1, 1, 6, 4), seed=13),
                                  v=rand((1, 1, 6, 4), seed=14),
                                  attn_mask=np.full((4, 6), -30000.0, np.float16)
                                  + rand((4, 6), seed=15))
    mask = np.ones((1, 1, 5, 6), bool)
    mask[0, 0, 2] = False
    cases["fully_masked_row"] = dict(q=rand((1, 1, 5, 4), seed=16), k=rand((1, 1, 6, 4), seed=17),
                                     v=rand((1, 1, 6, 4), seed=18), attn_mask=mask)
    big_mask = np.where(np.tri(6, 6, dtype=bool), 0.0, np.finfo(np.float32).min).astype(np.float32)
    cases["finfo_min_mask"] = dict(q=rand((1, 1, 6, 4), np.float32, seed=19),
                                   k=rand((1, 1, 6, 4), np.float32, seed=20),
                                   v=rand((1, 1, 6, 4), np.float32, seed=21), attn_mask=big_mask)
    return cases


@pytest.mark.parametrize("name", sorted(adversarial_cases()))
def test_adversarial_crosscheck(name):
    args = adversarial_cases()[name]
    r = oracle.attention(**args)
    assert r.certified
    rows = int(np.prod(r.out.shape[:3]))
    rep = oracle.crosscheck(r, **args, rows=min(rows, 16), seed=3)
    assert rep.ok, rep.failures[:3]
    assert rep.worst_ratio <= 1.0


def test_float64_bound_sound_where_fallback_needed():
    """Logits ~1e7: float64's bound is still sound but too loose, so auto
    recomputes the rows with mpmath, and both results check out."""
    rng = np.random.default_rng(5)
    q = (rng.standard_normal((1, 1, 6, 8)) * 3000).astype(np.float32)
    k = (rng.standard_normal((1, 1, 9, 8)) * 3000).astype(np.float32)
    v = (np.where(np.arange(9)[:, None] % 2 == 0, 1e4, -1e4) + rng.standard_normal((9, 4))).astype(np.float32)
    v = v[None, None]
    f64 = oracle.attention(q, k, v, mode="float64")
    assert not f64.certified
    assert oracle.crosscheck(f64, q, k, v, rows=6).ok
    auto = oracle.attention(q, k, v, refine=False)  # the mpmath tier (the compensated one: test_oracle_tiers)
    assert auto.mp_rows > 0 and auto.certified
    assert set(auto.mp_row_index) == {(0, 0, i) for i in range(6) if not _row_ok(f64, i)}
    assert oracle.crosscheck(auto, q, k, v, rows=6).ok
    assert (auto.err_bound <= f64.err_bound).all()


def _row_ok(r, i):
    tol = r.rtol_target * np.maximum(np.abs(r.out[0, 0, i]), r.row_scale[0, 0, i])
    return bool((r.err_bound[0, 0, i] <= tol).all() and r.lse_err_bound[0, 0, i]
                <= r.rtol_target * max(abs(r.lse[0, 0, i]), 1.0))


def test_strict_target_sends_every_row_to_mpmath():
    q, k, v = (rand((1, 1, 4, 4), seed=s) for s in (1, 2, 3))
    r = oracle.attention(q, k, v, rtol_target=2**-50)
    assert r.mp_rows == 4
    assert r.certified
    assert oracle.crosscheck(r, q, k, v, rows=4).ok


def test_crosscheck_rows_option():
    q, k, v = (rand((1, 2, 4, 4), seed=s) for s in (1, 2, 3))
    assert oracle.attention(q, k, v, crosscheck_rows=3).certified
    with pytest.raises(ValueError, match="crosscheck_rows"):
        oracle.attention(q, k, v, crosscheck_rows=-1)


def test_crosscheck_detects_a_wrong_result():
    q, k, v = (rand((1, 1, 4, 4), seed=s) for s in (1, 2, 3))
    r = oracle.attention(q, k, v)
    import dataclasses

    bad = dataclasses.replace(r, out=r.out + 4 * r.err_bound + 1e-15)
    rep = oracle.crosscheck(bad, q, k, v, rows=4)
    assert not rep.ok and rep.worst_ratio > 1


# -- exact inputs -------------------------------------------------------------

def test_bf16_values_used_exactly():
    # 300032 = 1.14453125 * 2**18 is a bf16 value beyond fp16's range, and
    # 1 + 2**-7 + ... : the single key gets weight 1, so out == v exactly.
    v = np.array([300032.0, 1 + 2**-7, -(2**-100) * 1.5, 3.0], dtype=ml_dtypes.bfloat16).reshape(1, 1, 1, 4)
    q = np.array([1.0078125, 2.0, -3.0], dtype=ml_dtypes.bfloat16).reshape(1, 1, 1, 3)
    r = oracle.attention(q, q, v)
    assert r.out.tolist() == v.astype(np.float64).tolist()
    assert (r.err_bound <= 1e-13 * np.abs(r.out)).all()
    # the logit uses the exact bf16 values: 1.0078125**2 + 4 + 9 scaled
    assert r.lse[0, 0, 0] == pytest.approx((1.0078125**2 + 13) / math.sqrt(3), rel=1e-15)


def test_bf16_numpy_and_torch_inputs_agree_bit_for_bit():
    q, k = (rand((1, 2, 5, 8), ml_dtypes.bfloat16, seed=s) for s in (1, 2))
    v = rand((1, 2, 5, 8), ml_dtypes.bfloat16, scale=1e-6, seed=3)  # subnormal in fp16
    r1 = oracle.attention(q, k, v)
    tq, tk, tv = (torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16) for x in (q, k, v))
    r2 = oracle.attention(tq, tk, tv)
    r3 = oracle.attention(*(x.astype(np.float64) for x in (q, k, v)))
    assert np.array_equal(r1.out, r2.out) and np.array_equal(r1.out, r3.out)
    # rounding the inputs through fp16 would change the answer
    r4 = oracle.attention(*(x.astype(np.float64).astype(np.float16) for x in (q, k, v)))
    assert not np.array_equal(r1.out, r4.out)


def test_default_scale_is_float64_one_over_sqrt_d():
    q, k, v = (rand((1, 1, 3, 24), seed=s) for s in (1, 2, 3))
    assert oracle.attention(q, k, v).scale == 1.0 / math.sqrt(24)
    assert oracle.attention(q, k, v, scale=0.125).scale == 0.125


# -- masks --------------------------------------------------------------------

def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = (rand((2, 1, 4, 4), seed=s) for s in (1, 2, 3))
    mask = np.ones((2, 1, 4, 4), bool)
    mask[1, 0, 3] = False
    add = np.zeros((4, 4), np.float16)
    add[0] = -np.inf
    for m, (b, i) in ((mask, (1, 3)), (add, (0, 0))):
        for mode in ("auto", "mpmath"):
            r = oracle.attention(q, k, v, attn_mask=m, mode=mode)
            assert (r.out[b, 0, i] == 0).all() and r.lse[b, 0, i] == -np.inf
            assert (r.err_bound[b, 0, i] == 0).all() and r.lse_err_bound[b, 0, i] == 0
            assert np.isfinite(r.out).all()


def torch_sdpa(q, k, v, **kw):
    t = [torch.from_numpy(np.asarray(x, dtype=np.float64)) for x in (q, k, v)]
    if kw.get("attn_mask") is not None:
        m = kw["attn_mask"]
        kw["attn_mask"] = torch.from_numpy(m if m.dtype == bool else m.astype(np.float64))
    return torch.nn.functional.scaled_dot_product_attention(*t, **kw).numpy()


@pytest.mark.parametrize("nq,nk", [(3, 7), (7, 3), (5, 5)])
def test_causal_top_left_matches_torch(nq, nk):
    q, k, v = rand((2, 2, nq, 8), seed=1), rand((2, 2, nk, 8), seed=2), rand((2, 2, nk, 8), seed=3)
    r = oracle.attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(r.out, torch_sdpa(q, k, v, is_causal=True), rtol=0, atol=1e-13)
    # key j visible to query i iff j <= i: row 0 is v[0] exactly
    assert np.array_equal(r.out[:, :, 0], v[:, :, 0].astype(np.float64))


@pytest.mark.parametrize("hkv", [1, 2])
def test_gqa_and_mqa_match_torch(hkv):
    q = rand((2, 4, 5, 8), seed=1)
    k, v = rand((2, hkv, 6, 8), seed=2), rand((2, hkv, 6, 3), seed=3)
    r = oracle.attention(q, k, v, enable_gqa=True, scale=0.3)
    np.testing.assert_allclose(r.out, torch_sdpa(q, k, v, enable_gqa=True, scale=0.3), rtol=0, atol=1e-13)
    # head h uses kv head h // (H // Hkv)
    solo = oracle.attention(q[:, 3:4], k[:, 3 // (4 // hkv)][:, None], v[:, 3 // (4 // hkv)][:, None], scale=0.3)
    assert np.array_equal(solo.out[:, 0], r.out[:, 3])


@pytest.mark.parametrize("mask_shape", [(5, 6), (1, 1, 5, 6), (2, 1, 1, 6), (2, 3, 5, 6)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_broadcast_masks_match_torch(mask_shape, kind):
    q, k, v = rand((2, 3, 5, 8), seed=1), rand((2, 3, 6, 8), seed=2), rand((2, 3, 6, 8), seed=3)
    rng = np.random.default_rng(7)
    if kind == "bool":
        mask = rng.random(mask_shape) < 0.7
        mask[..., 0] = True  # torch gives NaN on fully masked rows
    else:
        mask = (rng.standard_normal(mask_shape) * 4).astype(np.float16)
    r = oracle.attention(q, k, v, attn_mask=mask)
    np.testing.assert_allclose(r.out, torch_sdpa(q, k, v, attn_mask=mask), rtol=0, atol=1e-13)
    assert oracle.crosscheck(r, q, k, v, attn_mask=mask, rows=4).ok


def test_attention_case_and_torch_mask():
    q, k, v = (rand((1, 2, 4, 4), seed=s) for s in (1, 2, 3))
    mask = np.tri(4, 4, dtype=bool)
    case = Case(q=q, k=k, v=v, attn_mask=mask, do=rand((1, 2, 4, 4), seed=4))
    r = oracle.attention_case(case, keep=True)
    assert r.dq is not None and r.s.shape == (1, 2, 4, 4) and r.p.shape == (1, 2, 4, 4)
    assert np.array_equal(r.out, oracle.attention(q, k, v, is_causal=True).out)
    assert np.array_equal(r.out, oracle.attention(q, k, v, attn_mask=torch.from_numpy(mask)).out)
    assert (r.s[0, 0][~mask] == -np.inf).all() and (r.p[0, 0][~mask] == 0).all()
    np.testing.assert_allclose(r.p.sum(-1), 1.0, rtol=1e-14)


# -- validation ---------------------------------------------------------------

Q = rand((1, 2, 3, 4), seed=1)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(q=Q[0]), ValueError, "rank 4"),
    (dict(k=rand((1, 2, 3, 5))), ValueError, "head dim"),
    (dict(k=rand((1, 1, 3, 4)), v=rand((1, 1, 3, 4))), ValueError, "enable_gqa"),
    (dict(q=rand((1, 3, 3, 4)), k=rand((1, 2, 3, 4)), v=rand((1, 2, 3, 4)), enable_gqa=True),
     ValueError, "multiple"),
    (dict(is_causal=True, attn_mask=np.ones((3, 3), bool)), ValueError, "mutually exclusive"),
    (dict(q=np.where(np.arange(4) == 1, np.nan, Q).astype(np.float16)), ValueError, "NaN"),
    (dict(q=Q.astype(np.int32)), TypeError, "dtype"),
    (dict(attn_mask=np.ones((4, 3), bool)), ValueError, "broadcast"),
    (dict(attn_mask=np.full((3, 3), np.inf)), ValueError, r"\+inf"),
    (dict(mode="fast"), ValueError, "mode"),
    (dict(mode="mpmath", prec=64), ValueError, "prec"),
    (dict(scale=float("nan")), ValueError, "finite"),
    (dict(scale="0.5"), TypeError, "scale"),
    (dict(dout=rand((1, 2, 3, 5))), ValueError, "dout"),
    (dict(v=rand((1, 2, 4, 4))), ValueError, "agree"),
    (dict(q=[[1.0]]), TypeError, "NumPy array"),
])
def test_validation(kwargs, exc, match):
    args = dict(q=Q, k=Q, v=Q)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        oracle.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_crosscheck_and_softmax_validation():
    r = oracle.attention(Q, Q, Q)
    with pytest.raises(ValueError, match="prec"):
        oracle.crosscheck(r, Q, Q, Q, prec=128)
    with pytest.raises(ValueError, match="scale"):
        oracle.crosscheck(r, Q, Q, Q, scale=0.1)
    with pytest.raises(TypeError, match="AttentionResult"):
        oracle.crosscheck(r.out, Q, Q, Q)
    with pytest.raises(ValueError, match="axis"):
        oracle.softmax(np.zeros(3), axis=1)
    with pytest.raises(ValueError, match="NaN"):
        oracle.logsumexp(np.array([0.0, np.nan]))
    with pytest.raises(TypeError, match="Case"):
        oracle.attention_case(r)


# -- softmax and log-sum-exp --------------------------------------------------

def softmax_cases():
    rng = np.random.default_rng(2)
    return {
        "normal": rng.standard_normal((3, 7)),
        "wide": rng.standard_normal((2, 9)) * 1e5,  # needs mpmath
        "with_-inf": np.where(rng.random((3, 6)) < 0.3, -np.inf, rng.standard_normal((3, 6)) * 50),
        "bf16": rng.standard_normal((4, 5)).astype(ml_dtypes.bfloat16),
        "tiny_weights": np.array([[0.0, -700.0, -740.0, -800.0, -1e300]]),
    }


@pytest.mark.parametrize("name", sorted(softmax_cases()))
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_logsumexp_within_bound(name, axis):
    x = np.asarray(softmax_cases()[name])
    sm, ls = oracle.softmax(x, axis=axis), oracle.logsumexp(x, axis=axis)
    xs = np.moveaxis(x.astype(np.float64), axis, -1)
    with mpmath.workprec(300):
        for idx in np.ndindex(xs.shape[:-1]):
            row = [mpmath.mpf(float(t)) for t in xs[idx] if t != -np.inf]
            m = max(row)
            ell = mpmath.fsum(mpmath.exp(t - m) for t in row)
            got = np.moveaxis(sm.value, axis, -1)[idx]
            bound = np.moveaxis(sm.err_bound, axis, -1)[idx]
            for j, t in enumerate(xs[idx]):
                exact = mpmath.exp(t - m) / ell if t != -np.inf else mpmath.mpf(0)
                assert abs(mpmath.mpf(float(got[j])) - exact) <= bound[j] + 1e-300
            exact_lse = m + mpmath.log(ell)
            assert abs(mpmath.mpf(float(ls.value[idx])) - exact_lse) <= ls.err_bound[idx]
    # certified: relative bound far below fp32 resolution wherever p is not tiny
    big = sm.value > 1e-250
    assert (sm.err_bound[big] <= 1e-3 * 2**-24 * sm.value[big]).all()
    strict = oracle.softmax(x, axis=axis, rtol_target=2**-50)
    assert strict.mp_rows > 0
    assert (np.abs(strict.value - sm.value) <= strict.err_bound + sm.err_bound).all()


def test_softmax_fully_masked_and_mpmath_mode():
    x = np.array([[-np.inf, -np.inf], [0.0, 1.0]])
    r = oracle.softmax(x, mode="mpmath")
    assert r.value[0].tolist() == [0.0, 0.0] and r.mp_rows == 2
    assert abs(r.value[1, 1] - 1 / (1 + math.exp(-1))) <= r.err_bound[1, 1] + 1e-16
    assert oracle.logsumexp(x).value[0] == -np.inf


def test_numpy_exp_and_log_within_assumed_ulps():
    """The float64 bound assumes exp/log within EXP_ULPS units in the last place."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-745, 0, 3000), rng.uniform(-1, 0, 1000), -rng.exponential(1e-3, 500)])
    y = np.concatenate([rng.uniform(1, 2, 1000), rng.uniform(1, 1e6, 1000)])
    worst = 0.0
    with mpmath.workprec(200):
        for t, got in zip(x, np.exp(x)):
            exact = mpmath.exp(mpmath.mpf(float(t)))
            worst = max(worst, float(abs(mpmath.mpf(float(got)) - exact)) / np.spacing(float(exact)))
        for t, got in zip(y, np.log(y)):
            exact = mpmath.log(mpmath.mpf(float(t)))
            worst = max(worst, float(abs(mpmath.mpf(float(got)) - exact)) / np.spacing(float(exact)))
    assert worst <= oracle.EXP_ULPS


# -- gradients ----------------------------------------------------------------

@pytest.mark.parametrize("setup", ["causal", "gqa_mask", "scaled"])
def test_gradients_match_autograd_and_mpmath(setup):
    if setup == "causal":
        q, k, v = rand((1, 2, 5, 4), seed=1), rand((1, 2, 7, 4), seed=2), rand((1, 2, 7, 3), seed=3)
        kw = dict(is_causal=True)
    elif setup == "gqa_mask":
        q, k, v = rand((1, 4, 4, 4), seed=1), rand((1, 2, 5, 4), seed=2), rand((1, 2, 5, 4), seed=3)
        mask = (np.random.default_rng(3).standard_normal((4, 5)) * 2).astype(np.float16)
        kw = dict(enable_gqa=True, attn_mask=mask)
    else:
        q, k, v = (rand((2, 1, 4, 4), np.float32, scale=4.0, seed=s) for s in (1, 2, 3))
        kw = dict(scale=0.9)
    do = rand(q.shape[:3] + (v.shape[3],), np.float32, seed=9)
    auto = oracle.attention(q, k, v, dout=do, **kw)
    mp = oracle.attention(q, k, v, dout=do, mode="mpmath", **kw)
    tq, tk, tv = (torch.from_numpy(x.astype(np.float64)).requires_grad_() for x in (q, k, v))
    tkw = dict(kw)
    if "attn_mask" in tkw:
        tkw["attn_mask"] = torch.from_numpy(tkw["attn_mask"].astype(np.float64))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **tkw)
    out.backward(torch.from_numpy(do.astype(np.float64)))
    for name, t in (("dq", tq), ("dk", tk), ("dv", tv)):
        a, m = getattr(auto, name), getattr(mp, name)
        ea, em = getattr(auto, name + "_err_bound"), getattr(mp, name + "_err_bound")
        assert a.shape == t.shape
        assert (np.abs(a - m) <= ea + em).all(), name
        assert (em <= 1e-14 * (np.abs(m).max() + 1)).all()  # mpmath's bound is tight
        assert (ea <= 1e-10 * (np.abs(a).max() + 1)).all()  # and auto's informative
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=0, atol=1e-12 * (np.abs(a).max() + 1))


def naive_mp_grads(q, k, v, do, *, scale, allowed=None, add=None, prec=300):
    """Textbook attention gradients in mpmath (fdot / fsum) at ``prec`` bits,
    dK and dV summed over the query heads of each kv group."""
    q, k, v, do = (np.asarray(x, dtype=np.float64) for x in (q, k, v, do))
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    allowed = np.broadcast_to(True if allowed is None else allowed, (B, H, Nq, Nk))
    add = np.broadcast_to(0.0 if add is None else add, (B, H, Nq, Nk))
    dq = np.empty((B, H, Nq, D), dtype=object)
    dk = np.empty((B, Hkv, Nk, D), dtype=object)
    dv = np.empty((B, Hkv, Nk, Dv), dtype=object)
    with mpmath.workprec(prec):
        dk[...], dv[...] = mpmath.mpf(0), mpmath.mpf(0)
        sc = mpmath.mpf(scale)
        for b in range(B):
            for h in range(H):
                kk, vv, dd = k[b, h // G].tolist(), v[b, h // G].tolist(), do[b, h].tolist()
                for i in range(Nq):
                    js = [j for j in range(Nk) if allowed[b, h, i, j]]
                    s = {j: sc * mpmath.fdot(q[b, h, i].tolist(), kk[j]) + float(add[b, h, i, j]) for j in js}
                    m = max(s.values(), default=0)
                    e = {j: mpmath.exp(s[j] - m) for j in js}
                    ell = mpmath.fsum(e.values())
                    p = {j: e[j] / ell for j in js}
                    o = [mpmath.fsum(p[j] * vv[j][c] for j in js) for c in range(Dv)]
                    delta = mpmath.fdot(dd[i], o)
                    ds = {j: p[j] * (mpmath.fdot(dd[i], vv[j]) - delta) for j in js}
                    for c in range(D):
                        dq[b, h, i, c] = sc * mpmath.fsum(ds[j] * kk[j][c] for j in js)
                    for j in js:
                        for c in range(D):
                            dk[b, h // G, j, c] += sc * ds[j] * float(q[b, h, i, c])
                        for c in range(Dv):
                            dv[b, h // G, j, c] += p[j] * dd[i][c]
    return dq, dk, dv


def gradient_cases():
    rng = np.random.default_rng(RNG_SEED)
    cases = {}
    # V nearly constant (1e3 + 1e-3 noise), dO in nearly opposite column pairs
    # (+-1e3, off by ~1): D = rowsum(dO o O) and dP = dO V^T are sums of
    # terms ~1e6 that cancel to ~1e3, and X = dP - D cancels again to ~10.
    r = rng.standard_normal((1, 1, 6, 3)) * 1e3
    do = np.empty((1, 1, 6, 6))
    do[..., 0::2], do[..., 1::2] = r, -r + rng.standard_normal(r.shape)
    cases["cancellation"] = dict(q=rand((1, 1, 6, 4), np.float32, seed=31), k=rand((1, 1, 8, 4), np.float32, seed=32),
                                 v=(1e3 + rng.standard_normal((1, 1, 8, 6)) * 1e-3).astype(np.float32),
                                 dout=do.astype(np.float32))
    # Nq != Nk (gamma of both sums), causal, GQA: dK and dV summed over groups
    cases["gqa_causal_rect"] = dict(q=rand((1, 4, 5, 4), seed=33), k=rand((1, 2, 9, 4), seed=34),
                                    v=rand((1, 2, 9, 3), seed=35), dout=rand((1, 4, 5, 3), seed=36),
                                    is_causal=True, enable_gqa=True)
    # every row from the multiple-precision path (its P, pi, tau feed the float backward)
    cases["mp_rows"] = dict(q=rand((1, 1, 4, 4), seed=37), k=rand((1, 1, 6, 4), seed=38),
                            v=rand((1, 1, 6, 4), seed=39), dout=rand((1, 1, 4, 4), seed=40),
                            attn_mask=(rng.standard_normal((4, 6)) * 3).astype(np.float16),
                            rtol_target=2.0**-50)
    # logits ~1e4 with one dominant key, and a fully masked row
    mask = np.ones((1, 1, 5, 7), bool)
    mask[0, 0, 3] = False
    cases["peaked_masked"] = dict(q=rand((1, 1, 5, 8), np.float32, scale=40, seed=41),
                                  k=rand((1, 1, 7, 8), np.float32, scale=40, seed=42),
                                  v=rand((1, 1, 7, 4), np.float32, seed=43),
                                  dout=rand((1, 1, 5, 4), np.float32, seed=44), attn_mask=mask)
    return cases


@pytest.mark.parametrize("name", sorted(gradient_cases()))
def test_gradient_bounds_against_plain_mpmath(name):
    """The float64 gradients lie within their bounds of a textbook evaluation
    at 300 bits, also where dP, D and dP - D cancel."""
    args = dict(gradient_cases()[name])
    r = oracle.attention(**args)
    q, k, v, do = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("dout")
    Nq, Nk, D = q.shape[2], k.shape[2], q.shape[3]
    allowed = add = None
    if args.get("is_causal"):
        allowed = np.tri(Nq, Nk, dtype=bool)
    elif "attn_mask" in args:
        m = args["attn_mask"]
        allowed = m if m.dtype == bool else None
        add = None if m.dtype == bool else m.astype(np.float64)
    if name == "mp_rows":
        assert r.mp_rows == Nq
    refs = naive_mp_grads(q, k, v, do, scale=1 / math.sqrt(D), allowed=allowed, add=add)
    with mpmath.workprec(300):
        for got, bound, ref in zip((r.dq, r.dk, r.dv), (r.dq_err_bound, r.dk_err_bound, r.dv_err_bound), refs):
            diff = np.vectorize(lambda a, b: float(abs(mpmath.mpf(float(a)) - b)))(got, ref)
            assert (diff <= bound + 1e-290).all(), (diff - bound).max()
            assert (bound <= 1e-6 * (np.abs(got).max() + 1)).all()  # and not vacuous


@pytest.mark.parametrize("name", sorted(gradient_cases()))
def test_fast_gradient_bound_not_below_textbook_form(name):
    """The float64 gradient bound (`_float_grads`, rearranged for speed) is
    never below the same bound in its textbook form (`_backward`, which mode
    "mpmath" evaluates), up to the rounding of evaluating either."""
    args = dict(gradient_cases()[name])
    rtol = args.pop("rtol_target", oracle.DEFAULT_RTOL_TARGET)
    pr = oracle._prepare(args.pop("q"), args.pop("k"), args.pop("v"), args.get("attn_mask"),
                         args.get("is_causal", False), None, args.get("enable_gqa", False), args.pop("dout"))
    res = oracle._float_forward(pr, False, need_p=True)
    rows = [tuple(int(x) for x in r) for r in np.argwhere(~oracle._certified_rows(res, rtol))]
    oracle._fill_mp_rows(pr, res, rows, 128)
    fast = oracle._float_grads(pr, res)
    ref = oracle._backward(res["p"], res["out"], pr.dout, pr.q, pr.k, pr.v, pr.scale, res["pi"], res["tau"],
                           res["err"], oracle.U, pr.groups, np.asarray)
    for f, r, fb, rb in zip(fast[:3], ref[:3], fast[3:], ref[3:]):
        assert (np.abs(f - r) <= fb).all()  # other rounding orders (cancellation shows them)
        assert (fb >= rb * (1 - 1e-12)).all()
        # and no looser, but for the tau terms (tiny: e^-700 over the row sum)
        assert (fb <= rb * (1 + 1e-12) + 1e-280).all()


def test_plain_attention_grad_matches_autograd():
    from flashcheck.verify.bench import plain_attention_grad

    q, k, v, do = (rand((1, 2, 6, 5), np.float64, seed=s) for s in (1, 2, 3, 4))
    out, dq, dk, dv = plain_attention_grad(q, k, v, do, 0.3)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=0.3)
    ref.backward(torch.from_numpy(do))
    for got, want in ((out, ref), (dq, tq.grad), (dk, tk.grad), (dv, tv.grad)):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=0, atol=1e-13)


# -- command line -------------------------------------------------------------

def test_cli_bench_oracle_and_usage_errors(tmp_path, capsys):
    import json

    from flashcheck.verify.cli import main

    path = tmp_path / "bench.json"
    assert main(["bench", "oracle", "--size", "32x8", "--repeat", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert rows[0]["N"] == 32 and rows[0]["certified"] and rows[0]["mp_rows"] == 0
    assert rows[0]["auto_s"] > 0 and rows[0]["mpmath_s"] > rows[0]["plain_s"]
    assert "auto/plain" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["bench", "nope"]) == 2
    assert main(["bench", "oracle", "--size", "12"]) == 2
    assert main(["bench", "oracle", "--repeat", "0"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_bench_oracle_grad(tmp_path, capsys):
    import json

    from flashcheck.verify.cli import main

    path = tmp_path / "grad.json"
    assert main(["bench", "oracle", "--grad", "--size", "24x8", "--repeat", "1", "--json", str(path)]) == 0
    (row,) = json.loads(path.read_text())
    assert (row["N"], row["D"], row["mp_rows"]) == (24, 8, 0) and row["certified"]
    assert row["plain_grad_s"] > 0 and row["grad_over_plain"] == row["oracle_grad_s"] / row["plain_grad_s"]
    assert 0 < row["max_rel_grad_bound"] < 1e-9
    assert "grad/plain" in capsys.readouterr().out
    assert main(["bench", "oracle", "--grad", "--mp-budget", "5"]) == 2
    assert "forward bench only" in capsys.readouterr().err


def test_bench_registry_rejects_duplicates():
    from flashcheck.verify.bench import register_bench

    with pytest.raises(ValueError, match="already registered"):
        register_bench("oracle", "again")(lambda argv: 0)
    with pytest.raises(ValueError, match="identifier"):
        register_bench("two words", "x")
