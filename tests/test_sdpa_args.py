"""The shared SDPA argument validator, and that the three entry points
(NumPy emulation, Triton kernel, oracle) give one message per bad input."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from flashcheck.kernels.numpy_attention import tiled_attention  # noqa: E402
from flashcheck.kernels.sdpa_args import (  # noqa: E402
    DtypeError,
    SdpaArgs,
    check_bool,
    check_finite,
    check_mask_values,
    check_sdpa_args,
)
from flashcheck.kernels.triton_flash import attention as triton_attention  # noqa: E402
from flashcheck.kernels.triton_flash import is_interpreted  # noqa: E402
from flashcheck.verify import oracle  # noqa: E402


def _z(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


def test_parses_numpy_and_torch_alike():
    q, k, v = _z(2, 4, 3, 8), _z(2, 2, 5, 8), _z(2, 2, 5, 6)
    want = SdpaArgs(B=2, Hq=4, Hkv=2, Nq=3, Nk=5, D=8, Dv=6, groups=2, dtype="fp32", is_causal=False,
                    enable_gqa=True, scale=1 / math.sqrt(8), mask="bool", mask_shape=(3, 5))
    mask = np.ones((3, 5), bool)
    assert check_sdpa_args(q, k, v, mask, enable_gqa=True) == want
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    assert check_sdpa_args(tq, tk, tv, torch.from_numpy(mask), enable_gqa=True) == want
    assert want.target_shape == (2, 4, 3, 5)


def test_parsed_options():
    q = _z(1, 1, 2, 4, dtype=ml_dtypes.bfloat16)
    a = check_sdpa_args(q, q, q, q[0, 0, :, :2], scale=np.float32(0.5), is_causal=False)
    assert (a.dtype, a.mask, a.scale) == ("bf16", "additive", 0.5)
    assert check_sdpa_args(q, q, q, is_causal=np.True_).is_causal is True
    e = _z(1, 0, 2, 4)
    assert check_sdpa_args(e, e, e, allow_empty=True).groups == 1
    assert check_sdpa_args(_z(1, 1, 2, 0), _z(1, 1, 3, 0), _z(1, 1, 3, 1), allow_empty=True).scale == 1.0
    # the oracle's leniencies
    mixed = check_sdpa_args(q, _z(1, 1, 2, 4), q, _z(2, 2), one_dtype=False, positive_scale=False, scale=-1)
    assert (mixed.dtype, mixed.mask, mixed.scale) == ("bf16", "additive", -1.0)


Q = _z(1, 2, 3, 4)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(q=[[1.0]]), TypeError, r"q must be a NumPy array or torch tensor, got list"),
    (dict(k=None), TypeError, r"k must be a NumPy array or torch tensor, got NoneType"),
    (dict(v=Q.astype(np.int32)), DtypeError, r"v has unsupported dtype int32; expected one of float16, "),
    (dict(q=Q.astype(bool)), DtypeError, r"q has unsupported dtype bool"),
    (dict(k=Q.astype(np.float16)), TypeError, r"q, k, v must share one dtype, got float32, float16, float32"),
    (dict(q=Q[0]), ValueError, r"q must have rank 4 \(B, H, N, D\), got shape \(2, 3, 4\)"),
    (dict(v=_z(1, 2, 0, 4)), ValueError, r"v is empty, shape \(1, 2, 0, 4\): B, H, N and the head dim"),
    (dict(k=_z(2, 2, 3, 4)), ValueError, r"batch sizes differ: q has 1, k 2, v 1"),
    (dict(k=_z(1, 2, 3, 5)), ValueError, r"head dims differ: q has D=4, k has D=5"),
    (dict(v=_z(1, 2, 5, 4)), ValueError, r"k and v shapes differ: k \(1, 2, 3, 4\), v \(1, 2, 5, 4\)"),
    (dict(v=_z(1, 1, 3, 4)), ValueError, r"k and v shapes differ.*must agree in heads and length"),
    (dict(k=_z(1, 1, 3, 4), v=_z(1, 1, 3, 4)), ValueError,
     r"q has 2 heads but k and v have 1; pass enable_gqa=True"),
    (dict(q=_z(1, 3, 3, 4), enable_gqa=True), ValueError, r"q's 3 heads to be a multiple of k and v's 2"),
    (dict(is_causal=1), TypeError, r"is_causal must be a bool, got int 1"),
    (dict(enable_gqa="yes"), TypeError, r"enable_gqa must be a bool, got str 'yes'"),
    (dict(scale="0.5"), TypeError, r"scale must be a real number or None, got str '0.5'"),
    (dict(scale=True), TypeError, r"scale must be a real number or None, got bool"),
    (dict(scale=0.0), ValueError, r"scale must be finite and positive, got 0.0; pass None"),
    (dict(scale=float("nan")), ValueError, r"scale must be finite and positive, got nan"),
    (dict(attn_mask=np.ones((3, 3), bool), is_causal=True), ValueError, r"mutually exclusive"),
    (dict(attn_mask=[[True]]), TypeError, r"attn_mask must be a NumPy array or torch tensor, got list"),
    (dict(attn_mask=_z(3, 3, dtype=np.int8)), TypeError,
     r"attn_mask must be bool or the query dtype float32 \(an additive mask\), got dtype int8"),
    (dict(attn_mask=_z(3, 3, dtype=np.float64)), TypeError, r"query dtype float32.*got dtype float64"),
    (dict(attn_mask=np.ones((4, 3), bool)), ValueError,
     r"attn_mask of shape \(4, 3\) does not broadcast to \(B, H, Nq, Nk\) = \(1, 2, 3, 3\)"),
    (dict(attn_mask=np.ones((2, 1, 3, 3), bool)), ValueError, r"does not broadcast"),  # would grow B
    (dict(attn_mask=np.ones((1, 1, 1, 3, 3), bool)), ValueError, r"rank 5, at most 4 is allowed"),
])
def test_each_bad_input_is_named(kwargs, exc, words):
    args = dict(q=Q, k=Q, v=Q)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        check_sdpa_args(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_options_change_the_rules_not_the_words():
    with pytest.raises(ValueError, match=r"scale must be finite, got inf"):
        check_sdpa_args(Q, Q, Q, scale=float("inf"), positive_scale=False)
    with pytest.raises(TypeError, match=r"attn_mask must be bool or floating point .*got dtype int8"):
        check_sdpa_args(Q, Q, Q, _z(3, 3, dtype=np.int8), one_dtype=False)
    with pytest.raises(DtypeError, match=r"q has unsupported dtype float64; expected one of float16, bfloat16, "
                                         r"float32$"):
        check_sdpa_args(*(_z(1, 1, 1, 1, dtype=np.float64),) * 3, formats=("fp16", "bf16", "fp32"))


def test_dtype_error_is_both_type_and_value_error():
    # the emulation used to raise ValueError here, the others TypeError
    assert issubclass(DtypeError, TypeError) and issubclass(DtypeError, ValueError)


def test_small_checks():
    assert check_bool(np.False_, "flag") is False
    with pytest.raises(ValueError, match=r"x contains -inf at index \(1,\); x must be finite"):
        check_finite(np.array([0.0, -np.inf]), "x")
    with pytest.raises(ValueError, match=r"attn_mask contains \+inf at index \(0, 1\)"):
        check_mask_values(np.array([[0.0, np.inf]]))
    with pytest.raises(ValueError, match=r"attn_mask contains NaN at index \(0,\)"):
        check_mask_values(np.array([np.nan, -np.inf]))
    check_mask_values(np.array([-np.inf, 3.0]))


def test_importable_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import flashcheck.kernels.sdpa_args, flashcheck.kernels.numpy_attention\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


# -- one message from all three entry points ----------------------------------

def _t(*shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


_T = (1, 2, 4, 8)
SAME_MESSAGE = [
    ("rank", dict(q=_t(2, 4, 8))),
    ("batch", dict(k=_t(2, 2, 4, 8), v=_t(2, 2, 4, 8))),
    ("head dim", dict(k=_t(1, 2, 4, 16), v=_t(1, 2, 4, 16))),
    ("kv length", dict(v=_t(1, 2, 5, 8))),
    ("kv heads", dict(v=_t(1, 1, 4, 8), enable_gqa=True)),
    ("gqa off", dict(k=_t(1, 1, 4, 8), v=_t(1, 1, 4, 8))),
    ("gqa divisible", dict(q=_t(1, 3, 4, 8), enable_gqa=True)),
    ("empty", dict(q=_t(1, 2, 0, 8))),
    ("causal flag", dict(is_causal=1)),
    ("gqa flag", dict(enable_gqa=None)),
    ("scale type", dict(scale="1")),
    ("mask and causal", dict(attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True)),
    ("mask shape", dict(attn_mask=torch.ones(3, 4, dtype=torch.bool))),
    ("mask rank", dict(attn_mask=torch.ones(1, 1, 1, 4, 4, dtype=torch.bool))),
]


def _message(fn, kwargs):
    args = dict(q=_t(*_T), k=_t(*_T), v=_t(*_T))
    args.update(kwargs)
    try:
        fn(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    return None


@pytest.mark.skipif(not is_interpreted(), reason="runs the Triton kernel on CPU tensors")
@pytest.mark.parametrize("case, kwargs", SAME_MESSAGE, ids=[c[0] for c in SAME_MESSAGE])
def test_all_entry_points_say_the_same(case, kwargs):
    got = {
        "triton": _message(triton_attention, kwargs),
        "oracle": _message(lambda q, k, v, **kw: oracle.attention(q, k, v, **kw), kwargs),
    }
    if case != "empty":  # the emulation computes empty attention (and only it)
        got["numpy"] = _message(tiled_attention, kwargs)
    first = got["triton"]
    assert first is not None, f"{case}: the Triton kernel accepted the bad input"
    for name, res in got.items():
        assert res == first, f"{case}: {name} says {res}, the Triton kernel {first}"
