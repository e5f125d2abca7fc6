"""Tests of properties/strategies.py: validity, reach, validation, and the
promise each magnitude class makes."""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from flashcheck.kernels.precision import FORMATS, format_of, from_float64, round_to, to_float64
from flashcheck.properties import inputs
from flashcheck.properties import strategies as S
from flashcheck.properties.case import LAYOUTS, Case

_BASE = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def quick(n):
    return settings(_BASE, max_examples=n)


def _exact(arr):
    """Round-tripping through the array's own format changes nothing."""
    x = to_float64(arr)
    back = to_float64(from_float64(x, format_of(arr.dtype)))
    return np.array_equal(back, x, equal_nan=True)


def _is_prime(n):
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _softmax64(s):
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    return e / e.sum(axis=-1, keepdims=True)


def _visible(case):
    """(B, H, Nq, Nk) bool: which keys each query sees."""
    B, H, Nq, Nk = case.q.shape[0], case.q.shape[1], case.q.shape[2], case.k.shape[2]
    if case.is_causal:
        vis = np.tril(np.ones((Nq, Nk), dtype=bool))
    elif case.attn_mask is None:
        vis = np.ones((Nq, Nk), dtype=bool)
    elif case.attn_mask.dtype == np.bool_:
        vis = case.attn_mask
    else:
        vis = to_float64(case.attn_mask) != -np.inf
    return np.broadcast_to(vis, (B, H, Nq, Nk))


# -- every case is valid ------------------------------------------------------

def check_case(case):
    assert isinstance(case, Case)
    json.dumps(case.describe())  # tags must survive Case.save
    B, H, Nq, D = case.q.shape
    Bk, Hkv, Nk, Dk = case.k.shape
    Bv, Hv, Nv, Dv = case.v.shape
    assert (Bk, Dk) == (B, D) and (Bv, Hv, Nv) == (B, Hkv, Nk)
    assert H % Hkv == 0
    assert case.enable_gqa == (Hkv != H)
    assert case.dtype in ("fp16", "bf16", "fp32")
    assert case.q.dtype == np.dtype(FORMATS[case.dtype].storage)
    tensors = {"q": case.q, "k": case.k, "v": case.v}
    for arr in (*tensors.values(), case.attn_mask, case.do):
        assert arr is None or arr.flags.writeable
    for arr in tensors.values():
        assert _exact(arr)
    if case.magnitude == "nan-inf":
        recorded = case.tags["nonfinite"]
        assert recorded
        for name, index, kind in recorded:
            value = to_float64(tensors[name])[index]
            assert (math.isnan(value) if kind == "nan" else value == float(kind))
        marked = {(name, tuple(index)) for name, index, _ in recorded}
        for name, arr in tensors.items():
            for index in zip(*np.nonzero(~np.isfinite(to_float64(arr)))):
                assert (name, tuple(int(i) for i in index)) in marked
    else:
        for arr in tensors.values():
            assert np.isfinite(to_float64(arr)).all()
    if case.scale is not None:
        assert math.isfinite(case.scale) and case.scale > 0
    # masks
    if case.attn_mask is not None:
        assert not case.is_causal
        np.broadcast_shapes(case.attn_mask.shape, (B, H, Nq, Nk))  # raises if not broadcastable
        if case.attn_mask.dtype != np.bool_:
            assert case.attn_mask.dtype == case.q.dtype
            assert _exact(case.attn_mask)
            assert not np.isnan(to_float64(case.attn_mask)).any()
    dead_rows = int((~_visible(case).any(axis=-1)).sum())
    assert case.tags["fully_masked_rows"] == dead_rows
    if case.mask_kind == "fully-masked-rows":
        assert dead_rows > 0
    if case.mask_kind in ("none", "causal"):
        assert case.attn_mask is None and case.is_causal == (case.mask_kind == "causal")
    if case.do is not None:
        assert case.do.shape == (B, H, Nq, Dv) and case.do.dtype == case.q.dtype
        assert _exact(case.do) and np.isfinite(to_float64(case.do)).all()
    if case.block_m is not None:
        assert case.block_m >= 1 and case.block_n >= 1


def check_layout(case):
    q, k, v, mask = case.to_torch()
    for t, arr in zip((q, k, v), (case.q, case.k, case.v)):
        assert np.array_equal(to_float64(t), to_float64(arr), equal_nan=True)
        _, Hd, N, Dd = arr.shape
        if case.layout == "contiguous":
            assert t.is_contiguous()
        elif case.layout == "bnhd":
            # (B, N, H, D) storage; strides of size-1 dimensions are meaningless.
            expected = (Dd, Hd * Dd, 1)
            assert all(st_ == ex for st_, ex, n in zip(t.stride()[1:], expected, t.shape[1:]) if n > 1)
        else:
            assert t.stride()[2:] == (Dd + 3, 1)  # padded rows: never contiguous storage
    if mask is not None:
        assert np.array_equal(to_float64(mask), to_float64(case.attn_mask))


@quick(60)
@given(S.cases(allow_nonfinite=True, with_grad=True, block_kind="numpy", max_seq=96))
def test_cases_are_valid(case):
    check_case(case)
    check_layout(case)


@quick(20)
@given(S.cases(dtypes=("bf16",), block_kind="triton", layouts=("strided",), max_seq=64, max_heads=8))
def test_cases_respect_options(case):
    check_case(case)
    check_layout(case)
    assert case.dtype == "bf16" and case.layout == "strided"
    assert case.block_m in S.TRITON_BLOCK_SIZES and case.block_n in S.TRITON_BLOCK_SIZES
    assert case.magnitude != "nan-inf"


@quick(40)
@given(S.shapes(max_batch=3, max_heads=6, max_seq=300, max_scores=5000))
def test_shapes_respect_bounds(shape):
    assert set(shape) == {"B", "H", "Hkv", "Nq", "Nk", "D", "Dv"}
    assert 1 <= shape["B"] <= 3 and 1 <= shape["H"] <= 6 and shape["H"] % shape["Hkv"] == 0
    assert 1 <= shape["Nq"] <= 300 and 1 <= shape["Nk"] <= 300
    assert shape["B"] * shape["H"] * shape["Nq"] * shape["Nk"] <= 5000
    assert 1 <= shape["D"] <= 256 and 1 <= shape["Dv"] <= 256


@quick(50)
@given(st.data())
def test_sizes_stay_in_range(data):
    lo = data.draw(st.integers(1, 50))
    hi = data.draw(st.integers(lo, 5000))
    assert lo <= data.draw(S.seq_lens(min_value=lo, max_value=hi)) <= hi
    assert lo <= data.draw(S.head_dims(min_value=lo, max_value=hi)) <= hi
    assert 1 <= data.draw(S.block_sizes(max_value=hi)) <= hi


@quick(60)
@given(st.data())
def test_logit_rows_are_exact(data):
    fmt = data.draw(st.sampled_from(["fp16", "bf16", "tf32", "fp32"]))
    x = data.draw(S.logit_rows(fmt))
    assert x.ndim == 2 and x.dtype == np.float64
    assert not np.isnan(x).any() and not (x == np.inf).any()
    assert np.array_equal(round_to(x, fmt), x)


# -- reach ---------------------------------------------------------------------

def _labels(case):
    sh = case.shape
    out = {f"magnitude:{case.magnitude}", f"mask:{case.mask_kind}", f"layout:{case.layout}",
           f"dtype:{case.dtype}"}
    if sh["Hkv"] == 1 < sh["H"]:
        out.add("MQA")
    if 1 < sh["Hkv"] < sh["H"]:
        out.add("GQA")
    for n in (sh["Nq"], sh["Nk"]):
        if _is_prime(n) and n > 3:
            out.add("prime N > 3")
        if n > 2 and (n - 1) & (n - 2) == 0:
            out.add("N = 2^k+1")
        if n > 2 and (n + 1) & n == 0:
            out.add("N = 2^k-1")
        if n > 16 and n % 16:
            out.add("N > 16, not a multiple of 16")
    if sh["Nq"] == 1:
        out.add("Nq = 1")
    if sh["Nq"] != sh["Nk"]:
        out.add("Nq != Nk")
    if case.v.shape[-1] != sh["D"]:
        out.add("Dv != D")
    if case.attn_mask is not None:
        out.add(f"mask ndim {case.attn_mask.ndim}")
        if case.attn_mask.shape[-2] == 1:
            out.add("key-padding mask")
    if case.tags["fully_masked_rows"]:
        out.add("some row fully masked")
    return out


def test_reach():
    """A few hundred cases cover every class the strategies promise."""
    seen = set()

    @settings(max_examples=300, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(S.cases(allow_nonfinite=True, max_seq=128))
    def collect(case):
        seen.update(_labels(case))

    collect()
    wanted = {f"magnitude:{m}" for m in S.MAGNITUDES} | {f"mask:{m}" for m in S.MASK_KINDS}
    wanted |= {f"layout:{x}" for x in LAYOUTS} | {f"dtype:{d}" for d in ("fp16", "bf16", "fp32")}
    wanted |= {"MQA", "GQA", "prime N > 3", "N = 2^k+1", "N = 2^k-1", "N > 16, not a multiple of 16",
               "Nq = 1", "Nq != Nk", "Dv != D", "mask ndim 2", "mask ndim 4", "key-padding mask",
               "some row fully masked"}
    assert wanted <= seen, f"never drawn: {sorted(wanted - seen)}"


# -- validation ----------------------------------------------------------------

_SHAPE = {"B": 1, "H": 2, "Hkv": 1, "Nq": 3, "Nk": 5, "D": 8, "Dv": 8}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: S.seq_lens(min_value=0), "min_value=0 must be at least 1"),
        (lambda: S.seq_lens(min_value=9, max_value=3), "larger than max_value"),
        (lambda: S.head_dims(max_value=2.5), "must be an integer"),
        (lambda: S.dtypes(allowed=()), "at least one dtype"),
        (lambda: S.dtypes(allowed=("fp8",)), "unknown floating-point format"),
        (lambda: S.dtypes(allowed=("tf32",)), "not an input format"),
        (lambda: S.block_sizes(kind="cuda"), "expected 'numpy' or 'triton'"),
        (lambda: S.shapes(max_scores=3, min_seq=2), "below min_seq"),
        (lambda: S.shapes(head_dims=64), "must be a Hypothesis strategy"),
        (lambda: S.magnitudes("fp16", allowed=("huge",)), "unknown magnitude entry 'huge'"),
        (lambda: S.magnitudes("fp16", allowed=("nan-inf",)), "allow_nonfinite=True"),
        (lambda: S.cases(magnitudes=("nan-inf",)), "allow_nonfinite=True"),
        (lambda: S.cases(layouts=("bhnd",)), "unknown layout entry"),
        (lambda: S.cases(block_kind="cuda"), "block_kind"),
        (lambda: S.masks(dict(_SHAPE, Hkv=3), "fp16"), "does not divide"),
        (lambda: S.masks(_SHAPE, "fp16", kinds=("random",)), "unknown mask kind"),
        (lambda: S.scales(min_value=0.0), "positive and finite"),
        (lambda: S.logit_rows("fp12"), "bad logits format"),
    ],
)
def test_strategy_arguments_are_validated(make, message):
    with pytest.raises(InvalidArgument, match=message):
        make()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(shape=dict(_SHAPE, Nq=0)), ValueError, r"shape\['Nq'\]=0 must be a positive integer"),
        (dict(shape={"B": 1}), ValueError, "missing"),
        (dict(shape=[1, 2, 3]), TypeError, "must be a dict"),
        (dict(dtype="int8"), ValueError, "bad dtype"),
        (dict(magnitude="loud"), ValueError, "unknown magnitude class"),
        (dict(seed=-1), ValueError, "non-negative integer"),
        (dict(scale=float("nan")), ValueError, "positive finite"),
        (dict(scale="big"), TypeError, "scale must be a float"),
    ],
)
def test_qkv_arguments_are_validated(kwargs, error, message):
    args = dict(shape=_SHAPE, dtype="fp16", magnitude="normal", seed=0)
    args.update(kwargs)
    scale = args.pop("scale", None)
    with pytest.raises(error, match=message):
        S.qkv(**args, scale=scale)


# -- what each class promises ---------------------------------------------------

def _qkv_inputs(magnitude, max_seq=48, min_nk=1):
    """(shape, dtype, scale, QKV) with the class's arrays."""
    @st.composite
    def build(draw):
        shape = draw(S.shapes(max_seq=max_seq, max_scores=4096, head_dims=S.head_dims(max_value=64)))
        if shape["Nk"] < min_nk:
            shape["Nk"] = min_nk
        dtype = draw(S.dtypes())
        scale = draw(S.scales(head_dim=shape["D"]))
        t = S.qkv(shape, dtype, magnitude, draw(st.integers(0, 2**32 - 1)), scale=scale)
        return shape, dtype, scale if scale is not None else 1 / math.sqrt(shape["D"]), t

    return build()


def _logits(t, scale):
    return inputs._logits64(t.q, t.k, scale)


@quick(30)
@given(_qkv_inputs("near-overflow-logits"))
def test_near_overflow_logits_exceed_88_in_every_row(args):
    shape, dtype, scale, t = args
    s = _logits(t, scale)
    assert (s.max(axis=-1) > S.FP32_EXP_OVERFLOW).all()
    assert np.abs(s).max() < FORMATS["fp32"].max
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(s.astype(np.float32))).any()  # the naive kernel overflows


@quick(30)
@given(_qkv_inputs("all-negative-logits"))
def test_all_negative_logits_underflow(args):
    shape, dtype, scale, t = args
    s = _logits(t, scale)
    assert s.max() <= -110
    with np.errstate(under="ignore"):
        assert (np.exp(s.astype(np.float32)) == 0).all()  # without max subtraction: l = 0


@quick(30)
@given(_qkv_inputs("near-max-input"))
def test_near_max_inputs_keep_logits_finite(args):
    shape, dtype, scale, t = args
    fmax = FORMATS[dtype].max
    big = max(np.abs(to_float64(t.q)).max(), np.abs(to_float64(t.k)).max())
    assert big >= fmax / 4 / 2 ** max(0, math.ceil(math.log2(scale)))
    assert np.isfinite(to_float64(t.q) * scale).all()
    assert np.abs(_logits(t, scale)).max() < FORMATS["fp32"].max
    v = np.abs(to_float64(t.v))
    if dtype == "fp16":
        assert v.min() >= fmax / 2
    else:  # room for an unnormalised fp32 sum over the keys
        assert v.min() >= fmax / 2 ** (math.ceil(math.log2(shape["Nk"])) + 2)
        assert np.isfinite(v.astype(np.float32).sum(axis=2, dtype=np.float32)).all()


@quick(30)
@given(_qkv_inputs("large-offset"))
def test_large_offset_rows(args):
    shape, dtype, scale, t = args
    s = _logits(t, scale)
    centre = np.abs(s.mean(axis=-1))
    spread = s.max(axis=-1) - s.min(axis=-1)
    assert (centre >= 90).all()
    assert (spread <= 0.25 * centre).all()


@quick(20)
@given(_qkv_inputs("uniform"))
def test_uniform_rows_are_constant(args):
    shape, dtype, scale, t = args
    # Exact structure: float64 matmul may sum in different orders per column.
    q, k = to_float64(t.q), to_float64(t.k)
    assert (q == 0).all() or (k == k[:, :, :1, :]).all()
    s = _logits(t, scale)
    assert np.allclose(s, s[..., :1], rtol=1e-12, atol=1e-12 * np.abs(s).max())


@quick(30)
@given(_qkv_inputs("one-hot", min_nk=2))
def test_one_hot_rows_have_a_dominant_key(args):
    shape, dtype, scale, t = args
    s = np.sort(_logits(t, scale), axis=-1)
    assert (s[..., -1] - s[..., -2] >= S.ONE_HOT_GAP * (1 - 1e-9)).all()


@quick(20)
@given(_qkv_inputs("subnormal"))
def test_subnormal_inputs(args):
    shape, dtype, scale, t = args
    tiny = FORMATS[dtype].tiny
    for arr in t[:3]:
        x = np.abs(to_float64(arr))
        sub = (x > 0) & (x < tiny)
        assert sub.any()
        assert (x <= 4 * tiny).all()


@quick(30)
@given(_qkv_inputs("v-cancellation", min_nk=2))
def test_v_cancellation(args):
    shape, dtype, scale, t = args
    p = _softmax64(_logits(t, scale))
    v = np.repeat(to_float64(t.v), shape["H"] // shape["Hkv"], axis=1)
    out, size = p @ v, p @ np.abs(v)
    assert (np.abs(out) < 1e-2 * size).any()


@quick(10)
@given(st.integers(0, 2**32 - 1))
def test_fa3_outlier_rate(seed):
    # 3 * 2 * 256 * 64 = 98304 draws of Bernoulli(0.001): mean 98, sd 9.9.
    shape = {"B": 1, "H": 2, "Hkv": 2, "Nq": 256, "Nk": 256, "D": 64, "Dv": 64}
    t = S.qkv(shape, "fp32", "fa3-outliers", seed)
    assert 48 <= t.tags["outliers"] <= 148
    x = np.concatenate([to_float64(a).ravel() for a in t[:3]])
    assert (np.abs(x) > 8).sum() >= 0.15 * t.tags["outliers"]  # N(0, 100) puts most far out


def test_qkv_is_deterministic_and_exact():
    for m in S.MAGNITUDES:
        a = S.qkv(_SHAPE, "bf16", m, 7, scale=0.3)
        b = S.qkv(_SHAPE, "bf16", m, 7, scale=0.3)
        for x, y in zip(a[:3], b[:3]):
            assert x.dtype.name == "bfloat16" and np.array_equal(to_float64(x), to_float64(y), equal_nan=True)
        assert a.tags == b.tags


# -- logit rows ------------------------------------------------------------------

@quick(80)
@given(st.data())
def test_logit_row_classes(data):
    kind = data.draw(st.sampled_from(S.LOGIT_CLASSES))
    x = data.draw(S.logit_rows("bf16", classes=(kind,), max_cols=32))
    finite_rows = np.isfinite(x).any(axis=1)
    if kind == "near-overflow":
        assert (x.max(axis=1) > S.FP32_EXP_OVERFLOW).all()
    elif kind == "all-negative":
        assert (x <= -110).all()
    elif kind == "uniform":
        assert (x == x[:, :1]).all()
    elif kind == "one-hot":
        s = np.sort(x, axis=1)
        assert (s[:, -1] - s[:, -2] >= S.ONE_HOT_GAP).all()
    elif kind == "large-offset":
        assert (np.abs(x.mean(axis=1)) >= 90).all()
    elif kind == "neg-inf-entries":
        assert finite_rows.all()
    elif kind == "full-neg-inf-rows":
        assert (~finite_rows).any() and (x[~finite_rows] == -np.inf).all()


# -- masks ---------------------------------------------------------------------

@quick(60)
@given(st.data())
def test_masks(data):
    shape = data.draw(S.shapes(max_seq=40, max_scores=4096))
    dtype = data.draw(S.dtypes())
    m = data.draw(S.masks(shape, dtype))
    full = (shape["B"], shape["H"], shape["Nq"], shape["Nk"])
    if m.attn_mask is not None:
        np.broadcast_shapes(m.attn_mask.shape, full)
        assert m.attn_mask.dtype in (np.dtype(np.bool_), np.dtype(FORMATS[dtype].storage))
    if m.kind == "sliding-window":
        left, right, align = m.tags["window"]
        offset = 0 if align == "top-left" else shape["Nk"] - shape["Nq"]
        i, j = np.arange(shape["Nq"])[:, None] + offset, np.arange(shape["Nk"])[None, :]
        expected = (j >= i - left) & (j <= i + right)
        assert (np.broadcast_to(m.attn_mask, full) == expected).all()
    if m.kind == "fully-masked-rows":
        assert m.tags["fully_masked_rows"] >= 1
