"""Issue 4's power check: emulations with a planted precision bug must exceed
the bound of the model they claim (``fa2``) on cases the strategies generate.

Each search is Hypothesis's own (`find`), derandomized, over the same case
strategy the soundness property uses; the search maximises nothing by hand:
it only needs one generated case where error > bound.
"""

import numpy as np
import pytest
from hypothesis import find, settings

from flashcheck.kernels import numpy_attention as na
from flashcheck.kernels.models import get_model
from flashcheck.properties import strategies as fs
from flashcheck.verify import oracle
from flashcheck.verify.bounds import attention_bound

pytestmark = pytest.mark.fuzz

PLANTED = {
    # the P V accumulator held in bf16 (rounded after every add and rescale)
    "pv-acc-bf16": dict(pv_acc="bf16"),
    # the logits rounded to fp16 before exp
    "logits-fp16": dict(logits="fp16"),
    # the row sum l accumulated in the input dtype
    "l-acc-input-dtype": dict(l_acc=None),
    # QK^T accumulated in fp16
    "qk-acc-fp16": dict(qk_acc="fp16"),
}


def _exceeds(case, claimed, buggy) -> bool:
    try:
        out = na.tiled_attention(case.q, case.k, case.v, case.attn_mask, case.is_causal, case.scale, case.enable_gqa,
                                 block_m=case.block_m, block_n=case.block_n, model=buggy)
    except ValueError:  # the bug overflowed: not the evidence we look for
        return False
    ref = oracle.attention_case(case, keep=True, with_grad=False)
    bound = attention_bound(ref, claimed, attn_mask=case.attn_mask).out + ref.err_bound
    with np.errstate(invalid="ignore"):
        return bool(np.any(np.abs(out - ref.out) > bound))


@pytest.mark.parametrize("bug", sorted(PLANTED))
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_planted_precision_bug_exceeds_fa2_bound(bug, dtype):
    claimed = get_model("fa2", dtype)
    changes = {k: (v or dtype) for k, v in PLANTED[bug].items()}
    buggy = claimed.replace(name=f"fa2-with-{bug}", **changes)
    strategy = fs.cases(dtypes=(dtype,), block_kind="numpy", max_seq=64, max_scores=2**13,
                        magnitudes=[m for m in fs.MAGNITUDES if m != "nan-inf"])
    case = find(strategy, lambda c: _exceeds(c, claimed, buggy),
                settings=settings(max_examples=200, derandomize=True, database=None, deadline=None))
    assert _exceeds(case, claimed, buggy)


def test_correct_emulation_never_exceeds_in_the_same_search():
    """Control: with no planted bug the same search finds nothing."""
    claimed = get_model("fa2", "bf16")
    strategy = fs.cases(dtypes=("bf16",), block_kind="numpy", max_seq=64, max_scores=2**13,
                        magnitudes=[m for m in fs.MAGNITUDES if m != "nan-inf"])
    from hypothesis.errors import NoSuchExample

    with pytest.raises(NoSuchExample):
        find(strategy, lambda c: _exceeds(c, claimed, claimed),
             settings=settings(max_examples=60, derandomize=True, database=None, deadline=None))
