"""The oracle's torch float64 path (``device=``), tiling (``tile_rows=``)
and row windows (``rows=``), against the NumPy path and mpmath.

Two certified results of the same problem must lie within the sum of their
bounds of each other; that is the comparison used throughout (the paths may
differ in the last bits: different summation orders).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from flashcheck.verify import oracle
from flashcheck.verify.bench import bench_oracle, oracle_device_timings

PAIRS = (("out", "err_bound"), ("lse", "lse_err_bound"), ("dq", "dq_err_bound"),
         ("dk", "dk_err_bound"), ("dv", "dv_err_bound"))


def assert_within(a, b, what=""):
    """a and b, two certified results, agree within err_a + err_b."""
    assert a.certified == b.certified, what
    for name, bound in PAIRS:
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, (what, name)
            continue
        assert type(y) is np.ndarray and y.dtype == np.float64 and x.shape == y.shape, (what, name)
        same = x == y  # also -inf == -inf (fully masked rows)
        with np.errstate(invalid="ignore"):
            ok = same | (np.abs(x - y) <= getattr(a, bound) + getattr(b, bound))
        assert ok.all(), (what, name, np.argwhere(~ok)[:3])


def make_case(seed, dtype=np.float16, B=2, H=4, Hkv=2, Nq=9, Nk=11, D=8, Dv=5, mask=None, grad=True):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Nq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Nk, Dv)).astype(dtype)
    kw = {"enable_gqa": H != Hkv}
    if mask == "causal":
        kw["is_causal"] = True
    elif mask == "bool":
        m = rng.random((B, 1, Nq, Nk)) < 0.6
        m[:, :, 1] = False  # a fully masked row
        kw["attn_mask"] = m
    elif mask == "add":
        m = rng.standard_normal((Nq, Nk)) * 3
        m[rng.random(m.shape) < 0.3] = -np.inf
        m[2] = -np.inf  # a fully masked row
        m[3, :2] = np.finfo(np.float64).min
        kw["attn_mask"] = m
    if grad:
        kw["dout"] = rng.standard_normal((B, H, Nq, Dv)).astype(dtype)
    return q, k, v, kw


CASES = [
    (np.float16, "causal", {}),
    (ml_dtypes.bfloat16, "bool", {}),
    (np.float32, "add", {}),
    (np.float16, None, {"H": 2, "Hkv": 2}),  # MHA
    (np.float32, "causal", {"Nq": 13, "Nk": 6}),  # Nq > Nk
    (ml_dtypes.bfloat16, "add", {"Nq": 4, "Nk": 17, "H": 3, "Hkv": 1}),  # Nq < Nk, GQA 3:1
]


@pytest.mark.parametrize("dtype,mask,shape", CASES)
def test_torch_cpu_matches_numpy_within_bounds(dtype, mask, shape):
    q, k, v, kw = make_case(1, dtype, mask=mask, **shape)
    ref = oracle.attention(q, k, v, **kw)
    got = oracle.attention(q, k, v, device="cpu", **kw)
    assert_within(ref, got, (dtype, mask))
    assert got.mp_row_index == ref.mp_row_index


@pytest.mark.parametrize("dtype,mask,shape", CASES)
@pytest.mark.parametrize("tile", [1, 3, 7])
def test_tiles_match_untiled(dtype, mask, shape, tile):
    q, k, v, kw = make_case(2, dtype, mask=mask, **shape)
    whole = oracle.attention(q, k, v, device="cpu", tile_rows=10**6, **kw)
    tiled = oracle.attention(q, k, v, device="cpu", tile_rows=tile, **kw)
    assert_within(whole, tiled, tile)
    # the NumPy path tiles the same way when asked
    assert_within(whole, oracle.attention(q, k, v, tile_rows=tile, **kw), ("numpy", tile))


def test_torch_inputs_of_any_float_dtype():
    q, k, v, kw = make_case(3, np.float32, mask="causal")
    ref = oracle.attention(q, k, v, **kw)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    kw["dout"] = torch.from_numpy(kw["dout"])
    got = oracle.attention(tq.to(torch.bfloat16).float(), tk, tv, device=torch.device("cpu"), **kw)
    assert got.out.shape == ref.out.shape and isinstance(got.dk, np.ndarray)
    assert_within(oracle.attention(tq.to(torch.bfloat16).float().numpy(), k, v, **kw), got)


def test_crosscheck_of_torch_results():
    q, k, v, kw = make_case(4, np.float16, mask="add", grad=False)
    r = oracle.attention(q, k, v, device="cpu", tile_rows=4, crosscheck_rows=6, **kw)
    rep = oracle.crosscheck(r, q, k, v, rows=10, seed=1, **kw)
    assert rep.ok and len(rep.rows) == 10


def test_huge_logits_escalate_on_the_host():
    """Logits ~1e7 defeat float64: those rows go to the multiple-precision
    path, also from the torch path, and are written into s and p."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    q[0, 1, 2] *= 3e6
    k = rng.standard_normal((1, 2, 7, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 7, 4)).astype(np.float32)
    do = rng.standard_normal((1, 2, 6, 4)).astype(np.float32)
    ref = oracle.attention(q, k, v, keep=True, dout=do)
    got = oracle.attention(q, k, v, device="cpu", keep=True, dout=do, tile_rows=2)
    assert got.mp_rows > 0 and got.certified
    assert got.mp_row_index == ref.mp_row_index
    assert_within(ref, got)
    b, h, i = got.mp_row_index[0]
    assert np.array_equal(got.p[b, h, i].numpy(), ref.p[b, h, i])  # the host row, written in
    assert oracle.crosscheck(got, q, k, v, rows=12).ok
    # without keep the gradients recompute P per tile and put the host rows in
    assert_within(ref, oracle.attention(q, k, v, device="cpu", dout=do, tile_rows=4))


@pytest.mark.parametrize("mask", ["causal", "bool", "add", None])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_rows_window_is_a_slice_of_the_whole(mask, device):
    q, k, v, kw = make_case(6, np.float32, mask=mask, grad=False)
    whole = oracle.attention(q, k, v, device=device, **kw)
    for i0, i1 in ((0, 9), (2, 5), (8, 9)):
        part = oracle.attention(q, k, v, device=device, rows=(i0, i1), **kw)
        assert part.row_range == (i0, i1) and part.out.shape[2] == i1 - i0
        for name, _ in PAIRS[:2]:
            sl = getattr(whole, name)[:, :, i0:i1]
            if device is None and (i0, i1) == (0, 9):
                assert getattr(part, name).tobytes() == sl.tobytes()  # the same computation
        sliced = oracle.AttentionResult(**{**whole.__dict__, **{
            f: getattr(whole, f)[:, :, i0:i1] for f in ("out", "lse", "err_bound", "lse_err_bound", "row_scale")}})
        assert_within(sliced, part, (i0, i1))
        assert oracle.crosscheck(part, q, k, v, rows=4, **kw).ok


def test_rows_report_global_indices_of_mp_rows():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 1, 8, 4))
    q[0, 0, 5] *= 1e7
    k, v = rng.standard_normal((1, 1, 8, 4)), rng.standard_normal((1, 1, 8, 3))
    for device in (None, "cpu"):
        assert oracle.attention(q, k, v, is_causal=True, device=device).mp_row_index == ((0, 0, 5),)
        part = oracle.attention(q, k, v, is_causal=True, device=device, rows=(4, 7))
        assert part.mp_row_index == ((0, 0, 5),) and part.certified


def test_keep_gives_device_tensors():
    q, k, v, kw = make_case(8, np.float16, mask="bool", grad=False)
    ref = oracle.attention(q, k, v, keep=True, **kw)
    got = oracle.attention(q, k, v, device="cpu", keep=True, tile_rows=4, **kw)
    for name in ("s", "p", "q", "k", "v"):
        t = getattr(got, name)
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == "cpu", name
        assert tuple(t.shape) == getattr(ref, name).shape, name
    assert np.array_equal(got.q.numpy(), ref.q) and np.array_equal(got.k.numpy(), ref.k)
    assert np.array_equal(np.isinf(got.s.numpy()), np.isinf(ref.s))
    # p within the forward's own bound |P^ - P| <= pi P^ + tau (tau tiny): loosely, 1e-12
    assert np.allclose(got.p.numpy(), ref.p, rtol=1e-12, atol=1e-300)
    for name in ("out", "lse", "err_bound"):
        assert isinstance(getattr(got, name), np.ndarray)


def test_input_validation():
    q, k, v, kw = make_case(9, np.float16, grad=True)
    with pytest.raises(ValueError, match="'gpu0'"):
        oracle.attention(q, k, v, device="gpu0")
    with pytest.raises(ValueError, match="device"):
        oracle.attention(q, k, v, device=3)
    with pytest.raises(ValueError, match="'meta'"):
        oracle.attention(q, k, v, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            oracle.attention(q, k, v, device="cuda")
    for bad in ((3, 3), (-1, 2), (0, 10), (1.0, 2), (1,), "0:2", (True, 2)):
        with pytest.raises(ValueError, match="rows"):
            oracle.attention(q, k, v, enable_gqa=True, rows=bad)
    with pytest.raises(ValueError, match="dout"):
        oracle.attention(q, k, v, rows=(0, 2), **kw)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="tile_rows"):
            oracle.attention(q, k, v, device="cpu", tile_rows=bad)


def test_bench_on_torch_cpu(capsys):
    t = oracle_device_timings(64, 16, device="cpu", repeat=1, tile_rows=16)
    assert t["certified"] and t["mp_rows"] == 0 and t["plain_s"] > 0 and t["auto_s"] > 0
    assert bench_oracle(["--device", "cpu", "--size", "48x8", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "cpu" in out and "48" in out


def test_torch_exp_expm1_log_within_assumed_ulps():
    """The float64 bound assumes exp, expm1 and log within EXP_ULPS units in
    the last place; this measures torch's CPU kernels (vectorised, long
    inputs) against mpmath, as test_oracle does for NumPy's. CUDA's are
    documented (docs/oracle.md, "On a device")."""
    import mpmath

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-745, 0, 2000), rng.uniform(-1, 0, 600), -rng.exponential(1e-3, 400)])
    z = np.concatenate([rng.uniform(0, 0.02, 500), rng.exponential(1e-6, 500)])  # sigma's range
    y = np.concatenate([rng.uniform(1, 2, 600), rng.uniform(1, 1e6, 600)])
    worst = 0.0
    with mpmath.workprec(200):
        for fn, mfn, xs in ((torch.exp, mpmath.exp, x), (torch.expm1, mpmath.expm1, z), (torch.log, mpmath.log, y)):
            got = fn(torch.from_numpy(xs)).numpy()
            for t, g in zip(xs, got):
                exact = mfn(mpmath.mpf(float(t)))
                if exact == 0:
                    continue
                worst = max(worst, float(abs(mpmath.mpf(float(g)) - exact)) / np.spacing(abs(float(exact))))
    assert worst <= oracle.EXP_ULPS
