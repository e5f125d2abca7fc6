"""Pins of Triton interpreter behaviour that kernels/triton_flash.py relies on.

Each test asserts what the interpreter does today; one failing means Triton
changed and the CPU path (UPCAST_DOT, the CPU precision model) needs a look.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit runs

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flashcheck.kernels.precision import round_to  # noqa: E402


@triton.jit
def _dot_kernel(A, B, C, UPCAST: tl.constexpr, PREC: tl.constexpr):
    r = tl.arange(0, 16)
    a = tl.load(A + r[:, None] * 16 + r[None, :])
    b = tl.load(B + r[:, None] * 16 + r[None, :])
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    tl.store(C + r[:, None] * 16 + r[None, :], tl.dot(a, b, input_precision=PREC))


@triton.jit
def _exp2_kernel(X, Y, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(Y + r, tl.math.exp2(tl.load(X + r)))


@triton.jit
def _div_kernel(X, Y, Z, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(Z + r, tl.math.div_rn(tl.load(X + r), tl.load(Y + r)))


pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="pins the CPU interpreter only")


def _dot(a, b, upcast, prec="ieee"):
    c = torch.empty((16, 16), dtype=torch.float32)
    _dot_kernel[(1,)](a, b, c, UPCAST=upcast, PREC=prec)
    return c


def test_bf16_dot_is_wrong_in_the_interpreter():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn((16, 16), generator=gen).bfloat16()
    b = torch.randn((16, 16), generator=gen).bfloat16()
    exact = a.double() @ b.double()
    raw = _dot(a, b, upcast=False)
    # Today the interpreter multiplies the bf16 bit patterns: far from the product.
    assert (raw.double() - exact).abs().max().item() > 1.0, "bf16 tl.dot is now right: drop the UPCAST path?"
    # Upcasting first is exact per product; fp32 accumulation of 16 terms stays within 16 fp32 ulps.
    up = _dot(a, b, upcast=True)
    assert (up.double() - exact).abs().max().item() <= 16 * 2.0**-24 * (a.double().abs() @ b.double().abs()).max()


def test_fp16_dot_upcast_matches_fp32_product():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn((16, 16), generator=gen).half()
    b = torch.randn((16, 16), generator=gen).half()
    up = _dot(a, b, upcast=True)
    ref = (a.float() @ b.float())
    assert (up - ref).abs().max().item() <= 16 * 2.0**-24 * (a.float().abs() @ b.float().abs()).max()


def test_tf32_is_ignored_by_the_interpreter():
    # Values needing more than tf32's 11 significant bits: a tf32 dot would round them.
    a = torch.full((16, 16), 1 + 2.0**-20, dtype=torch.float32)
    b = torch.eye(16, dtype=torch.float32)
    assert torch.equal(_dot(a, b, upcast=False, prec="tf32"), a)
    assert torch.equal(_dot(a, b, upcast=False, prec="ieee"), a)


#: The documented worst case the CPU precision model assumes for NumPy's
#: float32 exp2 (4 ulp: NumPy's SVML code, numpy/numpy#19478; glibc: 1 ulp).
#: A host's own rounding is not asserted: one Xeon was 2 ulp off where this
#: machine is exact. See docs/error-bounds.md, "exp on the CPU path".
EXP2_ULPS = 4
FP32_SUBNORMAL_SPACING = 2.0**-149


def test_exp2_within_documented_worst_case():
    from flashcheck.kernels.triton_flash import precision_model

    x = np.linspace(-140.0, 10.0, 4090).astype(np.float32)
    sub = np.linspace(-149.0, -126.0, 4095).astype(np.float32)  # subnormal results; 8192 points in all
    x = np.concatenate([x, sub, np.float32([0.0, -0.5, -1e-7, -126.0, -126.023476, -148.0, -149.0])])
    y = torch.empty(x.size, dtype=torch.float32)
    _exp2_kernel[(1,)](torch.from_numpy(x), y, N=x.size)
    got = y.numpy().astype(np.float64)
    # float64 exp2 is within a few float64 ulps: exact for this purpose (2**-50 relative).
    exact = np.exp2(x.astype(np.float64))
    normal = exact >= 2.0**-126
    # Normal results: a relative error of EXP2_ULPS ulps (ulp <= 2**-23 |y|).
    rel = np.abs(got - exact)[normal] / exact[normal]
    assert rel.max() <= EXP2_ULPS * 2.0**-23, f"exp2 relative error {rel.max():.3g} beyond {EXP2_ULPS} ulp"
    # Subnormal results: an absolute error of EXP2_ULPS subnormal spacings.
    err = np.abs(got - exact)[~normal]
    assert err.max() <= EXP2_ULPS * FP32_SUBNORMAL_SPACING, f"exp2 subnormal error {err.max():.3g}"
    # Subnormal results are kept (the GPU's ex2.approx.ftz.f32 flushes them to 0).
    assert got[-2] > 0 and got[-1] > 0
    # The CPU model covers this worst case: the relative part through
    # exp_rel_err, the absolute part through the bounds' 2**-126 exp2 term.
    model = precision_model("fp32", device="cpu")
    assert model.exp_impl == "exp2" and model.exp_rel_err >= EXP2_ULPS * 2.0**-23
    assert EXP2_ULPS * FP32_SUBNORMAL_SPACING <= 2.0**-126


def test_exp2_of_minus_inf_is_zero():
    y = torch.empty(16, dtype=torch.float32)
    _exp2_kernel[(1,)](torch.full((16,), -float("inf")), y, N=16)
    assert torch.equal(y, torch.zeros(16))


def test_div_rn_is_correctly_rounded():
    gen = np.random.default_rng(2)
    x = gen.standard_normal(256).astype(np.float32)
    d = (gen.random(256) + 0.5).astype(np.float32)
    z = torch.empty(256, dtype=torch.float32)
    _div_kernel[(1,)](torch.from_numpy(x), torch.from_numpy(d), z, N=256)
    want = round_to(x.astype(np.float64) / d.astype(np.float64), "fp32")
    assert np.array_equal(z.numpy().astype(np.float64), want)


@triton.jit
def _cast_kernel(X, Y, BF16: tl.constexpr):
    r = tl.arange(0, 16)
    x = tl.load(X + r)
    if BF16:
        tl.store(Y + r, x.to(tl.bfloat16))
    else:
        tl.store(Y + r, x.to(tl.float16))


def test_fp32_to_bf16_conversion_truncates_in_the_interpreter():
    # Quirk: the interpreter converts fp32 -> bf16 toward zero, where the GPU
    # (cvt.rn.bf16.f32) rounds to nearest. On the CPU path this rounds P and
    # the output of bf16 attention toward zero.
    x = np.float32([1 + 2.0**-8 + 2.0**-20, -(1 + 2.0**-8 + 2.0**-20), 1 + 2.0**-7 + 2.0**-8 + 2.0**-9] + [0.5] * 13)
    y = torch.empty(16, dtype=torch.bfloat16)
    _cast_kernel[(1,)](torch.from_numpy(x), y, BF16=True)
    got = y.float().numpy().astype(np.float64)
    assert np.array_equal(got, round_to(x.astype(np.float64), "bf16", mode="zero")), "bf16 cast changed"
    assert not np.array_equal(got, x.astype(ml_dtypes.bfloat16).astype(np.float64))


def test_fp32_to_fp16_conversion_rounds_to_nearest():
    x = np.float32([1 + 2.0**-11 + 2.0**-20, -(1 + 2.0**-11 + 2.0**-20), 1 + 2.0**-11] + [0.5] * 13)
    y = torch.empty(16, dtype=torch.float16)
    _cast_kernel[(1,)](torch.from_numpy(x), y, BF16=False)
    assert np.array_equal(y.numpy().astype(np.float64), round_to(x.astype(np.float64), "fp16"))


@triton.jit
def _widen_kernel(x_ptr, y_ptr):
    offs = tl.arange(0, 4)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.float32))


@triton.jit
def _narrow_kernel(x_ptr, y_ptr):
    offs = tl.arange(0, 4)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


BF16_SUBNORMALS = [5.877471754111438e-39, 1.0102e-39, 9.183549615799121e-41, 1.0]


def test_interpreter_mangles_bf16_subnormals():
    """Pinned quirk, found by the fuzzer (a bf16 case with subnormal V came
    out as 0): the interpreter's bf16 <-> fp32 conversions lose or change
    subnormals. The kernel's CPU path therefore widens bf16 through its bits
    (`_f32`) and stores bf16 results as fp32 narrowed by torch. If this test
    starts failing, Triton fixed it and the workarounds can go."""
    x = torch.tensor(BF16_SUBNORMALS, dtype=torch.bfloat16)
    widened = torch.zeros(4)
    _widen_kernel[(1,)](x, widened)
    narrowed = torch.zeros(4, dtype=torch.bfloat16)
    _narrow_kernel[(1,)](x.float(), narrowed)
    exact = x.float()
    assert widened[3] == exact[3] and narrowed[3] == x[3]  # normal numbers are fine
    assert not torch.equal(widened[:3], exact[:3]), "interpreter now widens bf16 subnormals exactly"
    assert not torch.equal(narrowed[:3].float(), exact[:3]), "interpreter now narrows to bf16 subnormals exactly"


@pytest.mark.interpreted_kernel
def test_kernel_keeps_bf16_subnormals_on_cpu():
    from flashcheck.kernels.triton_flash import attention

    v = torch.tensor(BF16_SUBNORMALS, dtype=torch.bfloat16).reshape(1, 1, 4, 1)
    q = torch.zeros(1, 1, 4, 1, dtype=torch.bfloat16)
    out = attention(q, q, v, is_causal=True)  # row i averages v[0..i]: row 0 is v[0] exactly
    assert out[0, 0, 0, 0] == v[0, 0, 0, 0]
