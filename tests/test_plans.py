"""Plans: balanced dealing, realisation of every feature, validation; and
capability learning on synthetic targets."""

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashcheck.properties.plans import (
    CHOICE_MAX,
    FEATURES,
    HEAD_DIM_CLASSES,
    N_CHOICES,
    PLAIN,
    TILE,
    Plan,
    PlanDealer,
    case_from_plan,
    feature_values,
    size_strata,
)
from flashcheck.properties.strategies import cases_from_plan, plan_choices
from flashcheck.verify.capabilities import Capabilities, describe_rule

ALL = feature_values()


def test_dealer_gives_every_value_its_share():
    dealer = PlanDealer(ALL, seed=3)
    plans = [dealer.deal() for _ in range(660)]  # 660 = a whole number of rounds of every feature
    for f in FEATURES:
        counts = collections.Counter(getattr(p, f) for p in plans)
        assert set(counts) == set(ALL[f])
        assert max(counts.values()) - min(counts.values()) <= 1, (f, counts)


def test_dealer_features_vary_independently():
    dealer = PlanDealer(ALL, seed=0)
    plans = [dealer.deal() for _ in range(600)]
    pairs = collections.Counter((p.size, p.mask) for p in plans)
    assert len(pairs) == len(ALL["size"]) * len(ALL["mask"])  # every combination occurs


def test_dealer_is_deterministic_and_avoids_rules():
    a, b = PlanDealer(ALL, seed=5), PlanDealer(ALL, seed=5)
    assert [a.deal() for _ in range(20)] == [b.deal() for _ in range(20)]
    rule = {"heads": "GQA", "mask": "causal"}
    assert not any(a.deal(avoid=[rule]).matches(rule) for _ in range(200))
    assert a.drop("dtype", "fp32") and all(a.deal().dtype != "fp32" for _ in range(30))
    only = PlanDealer(feature_values(dtypes=("fp16",)), seed=0)
    assert not only.drop("dtype", "fp16"), "the last value of a feature is never dropped"
    assert only.deal(avoid=[{"dtype": "fp16"}], tries=20) is None


@pytest.mark.parametrize("bad, match", [
    (dict(dtypes=("fp8",)), "unknown dtypes"),
    (dict(masks=()), "must not be empty"),
    (dict(head_dims=("huge",)), "unknown head-dim class"),
    (dict(head_dims=(0,)), "positive integer"),
    (dict(sizes=("giant",)), "unknown sizes"),
])
def test_feature_values_rejects_bad_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        feature_values(**bad)


@pytest.mark.parametrize("raw", [[0] * N_CHOICES, [CHOICE_MAX] * N_CHOICES])
def test_case_from_plan_realises_every_feature_at_the_extremes(raw):
    dealer = PlanDealer(ALL, seed=1)
    for _ in range(120):
        _check_realised(dealer.deal(), raw)


@settings(max_examples=150, deadline=None)
@given(st.data(), plan_choices)
def test_case_from_plan_realises_every_feature(data, raw):
    f = {k: data.draw(st.sampled_from(v)) for k, v in ALL.items()}
    _check_realised(Plan(**f), raw)


def _check_realised(plan, raw):
    case = case_from_plan(plan, raw)
    s = case.shape
    stratum = size_strata("cpu")[plan.size]
    assert case.dtype == plan.dtype and case.layout == plan.layout and case.magnitude == plan.magnitude
    assert case.mask_kind == plan.mask
    assert case.is_causal == (plan.mask == "causal")
    assert (case.attn_mask is None) == (plan.mask in ("none", "causal"))
    assert case.tags["heads"] == plan.heads and case.tags["plan"] == plan.as_dict()
    assert (s["Nq"] == s["Nk"]) == (plan.lengths == "equal")
    assert (case.v.shape[-1] == s["D"]) == (plan.dv == "same")
    assert s["D"] in HEAD_DIM_CLASSES[plan.head_dim]
    assert s["B"] * s["H"] * s["Nq"] * s["Nk"] <= 2**16
    if plan.lengths == "different":
        assert stratum.nk[0] <= s["Nk"] <= stratum.nk[1], (plan, s)
        assert stratum.nq[0] <= s["Nq"] <= stratum.nq[1], (plan, s)
    for n in {s["Nq"], s["Nk"]}:
        if plan.align == "ragged":
            assert n % 16, (plan, s)
        elif n > 17:
            assert n % 16 == 0, (plan, s)


def test_key_and_query_tile_strata_have_several_tiles():
    strata = size_strata("cpu")
    assert strata["key-tiles"].nk[0] > 2 * TILE and strata["query-tiles"].nq[0] > TILE
    assert strata["both-tiles"].nq[0] > TILE and strata["both-tiles"].nk[0] > 2 * TILE
    assert strata["long"].nk[0] > 8 * TILE
    assert size_strata("cuda")["long"].nk[1] >= 4096


def test_cases_from_plan_strategy_validates():
    from hypothesis.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="must be a Plan"):
        cases_from_plan({"size": "tiny"})
    with pytest.raises(InvalidArgument, match="block_kind"):
        cases_from_plan(Plan(**PLAIN), block_kind="cuda")


# -- capability learning ----------------------------------------------------------

def _learn_all(declines, values=ALL, n=60, seed=0):
    """Learn a synthetic target's rules from dealt plans; return the learner."""
    cap = Capabilities("t", values)
    dealer = PlanDealer(values, seed=seed)
    for _ in range(n):
        plan = dealer.deal(avoid=cap.rules)
        if plan is None:
            break
        if declines(plan):
            cap.learn(plan, "no", declines)
    return cap


def test_learns_single_feature_declines_on_the_first_decline():
    def declines(p):
        return p.dtype == "fp32" or p.mask in ("additive", "bool-random") or p.heads != "MHA"

    cap = Capabilities("t", ALL)
    first = Plan(**{**PLAIN, "heads": "GQA", "mask": "additive"})
    rule = cap.learn(first, "no GQA", declines)
    assert rule in ({"heads": "GQA"}, {"mask": "additive"})
    assert {describe_rule(r) for r in cap.rules} == {
        "dtype=fp32", "mask=additive", "mask=bool-random", "heads=MQA", "heads=GQA"}
    assert not cap.declines(Plan(**PLAIN)) and cap.declines(first)


def test_learns_combinations():
    def declines(p):
        return p.heads == "GQA" and p.mask == "causal"

    cap = _learn_all(declines, n=200)
    assert {"heads": "GQA", "mask": "causal"} in cap.rules
    assert all(len(r) == 2 for r in cap.rules), cap.rules  # neither value alone is declined


def test_an_unsupported_plain_value_moves_the_plain_case():
    def declines(p):  # an fp32-only kernel
        return p.dtype != "fp32"

    cap = _learn_all(declines)
    assert {"dtype": "fp16"} in cap.rules and {"dtype": "bf16"} in cap.rules and not cap.everything
    assert cap.plain["dtype"] == "fp32"


def test_a_target_that_declines_everything_is_marked():
    cap = _learn_all(lambda p: True, n=3)
    assert cap.everything and describe_rule(cap.rules[0]) == "everything"


def test_cuda_long_context_strata():
    """Decode, keys on both sides of 2**16, and the opt-in square 2**16 stratum."""
    from flashcheck.properties.plans import SIZE_STRATA, strata_names

    strata = size_strata("cuda")
    assert strata_names("cpu") == SIZE_STRATA
    assert set(strata_names("cuda")) == set(SIZE_STRATA) | {"decode", "past-64k"}
    assert "huge" in strata_names("cuda", every=True) and "huge" not in strata_names("cuda")
    assert strata["decode"].nq[1] <= 8 and strata["decode"].nk[1] > 2**17
    lo, hi = strata["past-64k"].nk
    assert lo < 2**16 - 128 and hi > 2**16 + 128
    assert strata["huge"].equal_range()[1] > 2**16
    with pytest.raises(ValueError, match="only on another device"):
        feature_values(sizes=("decode",))
    assert feature_values(device="cuda")["size"] == strata_names("cuda")


@pytest.mark.parametrize("size", ["decode", "past-64k", "huge"])
def test_long_context_cases_stay_in_their_stratum(size):
    from flashcheck.properties.plans import MASK_PLANE_CAP, N_CHOICES

    stratum = size_strata("cuda")[size]
    rng = np.random.default_rng(5)
    dealer = PlanDealer(feature_values(device="cuda", sizes=(size,), dtypes=("fp16",), head_dims=("tiny",),
                                       magnitudes=("normal",)), seed=2)
    seen = set()
    for _ in range(4 if size == "huge" else 12):  # a huge case is 2**16 keys of inputs to draw
        plan = dealer.deal()
        case = case_from_plan(plan, rng.integers(0, 2**16, N_CHOICES).tolist(), device="cuda")
        s = case.describe()
        B, H, Nq, Nk = s["B"], s["H"], s["Nq"], s["Nk"]
        assert B * H * Nq * Nk <= stratum.max_scores, (plan, s)
        assert stratum.nk[0] <= Nk <= stratum.nk[1] or case.attn_mask is not None, (plan, s)
        if case.attn_mask is not None:
            assert Nq * Nk <= MASK_PLANE_CAP, (plan, s)
        if not stratum.square:
            assert Nq < Nk and Nq <= stratum.nq[1], (plan, s)
        seen.add(Nk > 2**16)
    if size == "past-64k":
        assert seen == {True, False}  # both sides of 2**16


def test_aligned_query_lengths_stay_in_the_stratum_when_keys_are_long():
    """Regression (found by test_case_from_plan_realises_every_feature): with
    4 heads under the 2**16 cap, an aligned both-tiles plan could draw Nk so
    long that no multiple of 16 was left for Nq in [65, 160], and Nq fell to 64."""
    plan = Plan(dtype="fp16", size="both-tiles", lengths="different", align="aligned", heads="GQA",
                head_dim="tiny", dv="same", mask="none", layout="contiguous", magnitude="normal")
    stratum = size_strata("cpu")["both-tiles"]
    rng = np.random.default_rng(0)
    heads = set()
    for _ in range(300):
        s = case_from_plan(plan, rng.integers(0, 2**16, N_CHOICES).tolist()).describe()
        heads.add(s["H"])
        assert stratum.nq[0] <= s["Nq"] <= stratum.nq[1] and s["Nq"] % 16 == 0, s
    assert 4 in heads
