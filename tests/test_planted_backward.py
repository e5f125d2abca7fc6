"""verify/planted_backward.py: every planted backward bug gives gradients
outside the precision model's bound on a small case made to show it; the
correct variants stay inside it on those cases and on generated ones; the
multi-tile bugs change nothing inside one tile; the exact (float64) path
agrees with torch autograd."""

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from flashcheck.kernels.models import default_model_name, get_model
from flashcheck.kernels.precision import from_float64, to_float64
from flashcheck.properties import strategies as fs
from flashcheck.properties.case import Case
from flashcheck.properties.inputs import MAGNITUDES
from flashcheck.properties.plans import CHOICE_MAX, N_CHOICES, PlanDealer, case_from_plan, feature_values
from flashcheck.verify import oracle
from flashcheck.verify import planted_backward as pb
from flashcheck.verify.grad_bounds import gradient_bound


def _case(dtype, *, B=1, H=2, Hkv=None, Nq=24, Nk=40, D=16, Dv=None, mask=None, is_causal=False, scale=None,
          seed=0, layout="contiguous"):
    """Standard normal inputs and dO, exact in ``dtype``; ``mask`` "bool",
    "additive" (with -inf entries) or "dead-rows" (bool, every third row
    sees nothing)."""
    rng = np.random.default_rng(seed)
    Hkv, Dv = Hkv or H, Dv or D
    q, k, v, do = (from_float64(rng.standard_normal(shape), dtype)
                   for shape in ((B, H, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv), (B, H, Nq, Dv)))
    attn_mask = None
    if mask in ("bool", "dead-rows"):
        attn_mask = rng.random((Nq, Nk)) < 0.6
        attn_mask[:, 0] = True
        if mask == "dead-rows":
            attn_mask[::3] = False
    elif mask == "additive":
        bias = 2 * rng.standard_normal((B, 1, Nq, Nk))
        bias[rng.random(bias.shape) < 0.3] = -np.inf
        bias[..., 0] = 0.0
        attn_mask = from_float64(bias, dtype)
    elif mask is not None:
        raise ValueError(mask)
    return Case(q=q, k=k, v=v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=Hkv != H,
                do=do, layout=layout)


# Each broken variant's case: the smallest feature set that shows it (one
# tile unless the bug lives past the first); dtypes spread over the three.
BUG_CASES = {
    "delta_missing": dict(dtype="fp16"),
    "delta_from_do": dict(dtype="bf16", seed=1),
    "dv_unnormalised_p": dict(dtype="fp32", seed=2),
    "backward_ignores_scale": dict(dtype="fp16", scale=0.5, seed=3),
    "lse_base_mismatch": dict(dtype="bf16", seed=4),
    "causal_ignored": dict(dtype="bf16", Nq=30, Nk=30, is_causal=True, seed=5),
    "causal_bottom_right": dict(dtype="fp32", Nq=16, Nk=40, is_causal=True, seed=6),
    "mask_ignored": dict(dtype="fp16", mask="bool", seed=7),
    "fully_masked_nan": dict(dtype="fp32", mask="dead-rows", seed=8),
    "gqa_dkdv_last_head": dict(dtype="fp16", H=4, Hkv=2, seed=9),
    "dk_missing_scale": dict(dtype="fp32", seed=10),
    "kv_tiles_floor": dict(dtype="fp16", Nq=20, Nk=100, seed=11),
    "ragged_query_tile_skipped": dict(dtype="bf16", Nq=100, Nk=20, seed=12),
    "dkdv_bf16_accumulator": dict(dtype="fp16", Nq=130, Nk=20, seed=13),
    "dq_overwritten": dict(dtype="fp32", Nq=20, Nk=100, seed=14),
}

# More cases the correct variants must pass, and a second face of two bugs.
EXTRA_CASES = {
    "mask_ignored/additive": dict(dtype="bf16", mask="additive", seed=20),
    "causal_bottom_right/nq>nk": dict(dtype="fp16", Nq=40, Nk=16, is_causal=True, seed=21),
    "mqa-causal-multi-tile": dict(dtype="bf16", H=3, Hkv=1, Nq=150, Nk=70, is_causal=True, seed=22),
    "gqa-additive-dv-multi-tile": dict(dtype="fp32", H=4, Hkv=2, Nq=70, Nk=130, Dv=8, mask="additive", seed=23),
    "dead-rows-bnhd": dict(dtype="fp16", B=2, mask="dead-rows", scale=0.9, layout="bnhd", seed=24),
    "strided-bool": dict(dtype="bf16", Nq=65, Nk=129, D=24, mask="bool", layout="strided", seed=25),
}
EXTRA_BUG = {"mask_ignored/additive": "mask_ignored", "causal_bottom_right/nq>nk": "causal_bottom_right"}
ALL_CASES = {**BUG_CASES, **EXTRA_CASES}


def _grads(name, case):
    """(output, (dq, dk, dv)) of the planted ``name`` on ``case``, via autograd."""
    q, k, v, mask = case.to_torch(requires_grad=True)
    out = getattr(pb, name)(q, k, v, attn_mask=mask, is_causal=case.is_causal, scale=case.scale,
                            enable_gqa=case.enable_gqa)
    do = torch.from_numpy(to_float64(case.do)).to(out.dtype)
    return out, torch.autograd.grad(out, (q, k, v), do)


def _bound(case, ref, out):
    """The gradient bound of the case's default model around the target's
    saved output; the LSE's error is the forward bound's, as for any
    target that does not return its LSE."""
    model = get_model(default_model_name(case.dtype), case.dtype)
    return gradient_bound(ref, model, dout=case.do, out_target=to_float64(out), lse_target=None,
                          attn_mask=case.attn_mask)


@functools.cache
def _reference(key):
    """(case, oracle, bound, output) of a named case: every variant has the
    same (correct) forward, so one bound serves them all."""
    case = _case(**ALL_CASES[key])
    ref = oracle.attention_case(case, keep=True, with_grad=True)
    out, _ = _grads("correct_tiled", case)
    return case, ref, _bound(case, ref, out), to_float64(out)


def _ratios(name, case, ref, bound=None, out_expected=None):
    """max |g - exact| / (bound + oracle error) per gradient, over the
    elements where the model applies (inf for a non-finite gradient there)."""
    out, grads = _grads(name, case)
    if out_expected is not None:
        assert np.array_equal(to_float64(out), out_expected), "every variant's forward is the correct one"
    bound = bound or _bound(case, ref, out)
    ratios = {}
    for label, g in zip(("dq", "dk", "dv"), grads):
        g, exact = to_float64(g), getattr(ref, label)
        allowed = getattr(bound, label) + getattr(ref, label + "_err_bound")
        assert g.shape == exact.shape
        fin = np.isfinite(allowed)
        err = np.abs(g[fin] - exact[fin])
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(np.isnan(err), np.inf, err / allowed[fin])
        ratios[label] = float(np.max(r, initial=0.0))
    return ratios


def _named_ratios(name, key):
    case, ref, bound, out = _reference(key)
    for label in ("dq", "dk", "dv"):
        assert np.isfinite(getattr(bound, label)).all(), f"{key}: the model must apply to the whole case"
    return _ratios(name, case, ref, bound, out)


def test_catalogue():
    assert len(BROKEN := pb.BROKEN_BACKWARD) >= 10 and set(BUG_CASES) == set(BROKEN)
    assert set(pb.MULTI_TILE_BACKWARD) <= set(BROKEN) and "correct_tiled" in pb.CORRECT_BACKWARD
    for name in (*BROKEN, *pb.CORRECT_BACKWARD):
        assert callable(getattr(pb, name)) and getattr(pb, name).__name__ == name


@pytest.mark.parametrize("key", sorted(BUG_CASES) + sorted(EXTRA_BUG))
def test_broken_backward_exceeds_bound(key):
    bug = EXTRA_BUG.get(key, key)
    ratios = _named_ratios(bug, key)
    assert max(ratios.values()) > 1, f"{bug} ({pb.BROKEN_BACKWARD[bug]}) passed: {ratios}"
    spec = ALL_CASES[key]
    multi = spec.get("Nq", 24) > pb.BLOCK_M or spec.get("Nk", 40) > pb.BLOCK_N
    assert multi == (bug in pb.MULTI_TILE_BACKWARD), "one-tile bugs show in one tile, the others need more"


@pytest.mark.parametrize("name", pb.CORRECT_BACKWARD)
def test_correct_backward_within_bound_on_bug_cases(name):
    for key in ALL_CASES:
        ratios = _named_ratios(name, key)
        assert max(ratios.values()) <= 1, (key, ratios)


@pytest.mark.parametrize("name", pb.CORRECT_BACKWARD)
@given(case=fs.cases(with_grad=True, max_seq=140, max_scores=2**13, max_heads=3))
@settings(max_examples=20, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_correct_backward_within_bound_on_generated_cases(name, case):
    ratios = _ratios(name, case, oracle.attention_case(case, keep=True, with_grad=True))
    assert max(ratios.values()) <= 1, (ratios, case.describe())


SINGLE_TILE = {
    "plain": dict(dtype="fp16", Nq=64, Nk=64),
    "causal-gqa": dict(dtype="bf16", H=4, Hkv=2, Nq=50, Nk=33, is_causal=True, seed=1),
    "dead-rows": dict(dtype="fp32", mask="dead-rows", Nq=64, Nk=17, seed=2),
}


@pytest.mark.parametrize("bug", pb.MULTI_TILE_BACKWARD)
def test_multi_tile_bugs_change_nothing_in_one_tile(bug):
    for spec in SINGLE_TILE.values():
        case = _case(**spec)
        _, want = _grads("correct_tiled", case)
        _, got = _grads(bug, case)
        for w, g in zip(want, got):
            assert torch.equal(w, g), (bug, spec)


# -- the exact path, and input handling ------------------------------------------

def _float64_inputs(seed=0, B=1, H=4, Hkv=2, Nq=70, Nk=130, D=5, Dv=3):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, H, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv))
    return [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("name", pb.CORRECT_BACKWARD)
@pytest.mark.parametrize("opts", [dict(), dict(is_causal=True), dict(scale=0.3, mask="bool"),
                                  dict(mask="additive")], ids=["plain", "causal", "scale-bool", "additive"])
def test_float64_path_matches_torch_autograd(name, opts):
    """Multi-tile, GQA and Dv != D in float64, where every rounding vanishes."""
    opts = dict(opts)
    q, k, v = _float64_inputs()
    gen = torch.Generator().manual_seed(1)
    kind = opts.pop("mask", None)
    if kind is not None:
        visible = torch.rand((1, 1, q.shape[2], k.shape[2]), generator=gen) < 0.7
        visible[..., 0] = True  # torch's SDPA gives NaN on rows that see nothing
        bias = torch.randn(visible.shape, generator=gen, dtype=torch.float64)
        opts["attn_mask"] = visible if kind == "bool" else bias.masked_fill(~visible, -torch.inf)
    do = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(getattr(pb, name)(q, k, v, enable_gqa=True, **opts), (q, k, v), do)
    want = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, **opts),
                               (q, k, v), do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_gradcheck_tiled():
    q, k, v = _float64_inputs(H=2, Hkv=1, Nq=3, Nk=4, D=3, Dv=2)
    mask = torch.tensor([[True, False, True, True]] * 2 + [[False] * 4])  # the last row sees nothing
    assert torch.autograd.gradcheck(lambda *t: pb.correct_tiled(*t, attn_mask=mask, enable_gqa=True), (q, k, v))


def test_fully_masked_rows_get_zero_gradients():
    case = _case("fp16", mask="dead-rows", Nq=9, Nk=5)
    for name in pb.CORRECT_BACKWARD:
        out, (dq, _, _) = _grads(name, case)
        assert not out[:, :, ::3].any() and not dq[:, :, ::3].any()


def test_inputs_it_does_not_model_or_accept():
    q = torch.randn(1, 2, 3, 4, dtype=torch.float16)
    with pytest.raises(NotImplementedError, match="NaN or Inf"):
        pb.correct_tiled(q.masked_fill(q > 1, torch.inf), q, q)
    with pytest.raises(NotImplementedError, match="dropout"):
        pb.delta_missing(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="enable_gqa"):
        pb.correct_tiled(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="mutually exclusive"):
        pb.correct_tiled(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True)
    with pytest.raises(TypeError, match="dtype"):
        pb.correct_tiled(q.int(), q.int(), q.int())


def test_correct_backward_within_bound_on_campaign_cases():
    """Cases from the campaign's generator (plans dealt over every feature:
    tile strata, GQA, masks, magnitudes, dtypes, layouts)."""
    mags = tuple(m for m in MAGNITUDES if m != "nan-inf")
    dealer = PlanDealer(feature_values(magnitudes=mags), seed=0)
    rng = np.random.default_rng(0)
    for _ in range(12):
        raw = [int(x) for x in rng.integers(0, CHOICE_MAX + 1, N_CHOICES)]
        case = case_from_plan(dealer.deal(), raw, max_scores=2**13, with_grad=True)
        ref = oracle.attention_case(case, keep=True, with_grad=True)
        for name in pb.CORRECT_BACKWARD:
            ratios = _ratios(name, case, ref)
            assert max(ratios.values()) <= 1, (name, ratios, case.describe())
