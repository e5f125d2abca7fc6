"""The ``math`` precision model (torch's math backend of
``scaled_dot_product_attention``): its definition, the NumPy emulation
against torch's own math backend on the CPU, and torch's forward and
gradients against `attention_bound` / `gradient_bound` under that model.

The facts the model rests on (docs/error-bounds-backward.md, "What torch's
math backend does") are pinned here too, so that a torch release that
changes them fails a test rather than a bound.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashcheck.kernels import numpy_attention as na
from flashcheck.kernels import numpy_backward as nb
from flashcheck.kernels.models import (
    ATEN_CPU_EXP_REL_ERR,
    CUDA_EXPF_REL_ERR,
    DIV_APPROX_REL_ERR,
    MODELS_FOR_DTYPE,
    check_model_name,
    get_model,
)
from flashcheck.kernels.precision import PrecisionModel, to_float64
from flashcheck.properties.case import Case
from flashcheck.verify import oracle
from flashcheck.verify.bounds import attention_bound
from flashcheck.verify.check import judge_gradients
from flashcheck.verify.grad_bounds import gradient_bound

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NP_DTYPES = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp32": np.float32}

# (B, H, Hkv, Nq, Nk, D, options): plain, causal, GQA, boolean mask with a
# fully masked row, additive mask with an explicit scale, one query.
CONFIGS = [
    (2, 2, 2, 9, 13, 16, {}),
    (1, 4, 2, 20, 20, 8, {"is_causal": True}),
    (1, 6, 2, 17, 40, 32, {}),
    (1, 2, 1, 7, 11, 8, {"mask": "bool"}),
    (2, 2, 2, 7, 33, 64, {"mask": "additive", "scale": 0.3}),
    (1, 4, 4, 1, 64, 16, {}),
]


def _inputs(dtype, cfg, seed):
    B, H, Hkv, Nq, Nk, D, opts = cfg
    rng = np.random.default_rng(seed)
    cast = NP_DTYPES[dtype]
    q, k, v = (rng.standard_normal(shape).astype(cast) for shape in ((B, H, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D)))
    do = rng.standard_normal((B, H, Nq, D)).astype(cast)
    mask = None
    if opts.get("mask") == "bool":
        mask = rng.random((Nq, Nk)) > 0.3
        mask[0] = False  # a fully masked row: the math backend's safe softmax gives 0
    elif opts.get("mask") == "additive":
        mask = rng.standard_normal((B, 1, Nq, Nk)).astype(cast)
    return Case(q=q, k=k, v=v, attn_mask=mask, is_causal=opts.get("is_causal", False), scale=opts.get("scale"),
                enable_gqa=H != Hkv, do=do)


def _torch_math(case):
    """torch's math backend on the CPU: (out, dq, dk, dv) as float64."""
    q, k, v, mask = case.to_torch("cpu", requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case.is_causal, scale=case.scale,
                                             enable_gqa=case.enable_gqa)
    out.backward(torch.from_numpy(to_float64(case.do)).to(out.dtype))
    return tuple(to_float64(t) for t in (out, q.grad, k.grad, v.grad))


def _opts(case):
    return dict(attn_mask=case.attn_mask, is_causal=case.is_causal, scale=case.scale, enable_gqa=case.enable_gqa)


def _bounds(case, model):
    ref = oracle.attention_case(case, keep=True, with_grad=True)
    fwd = attention_bound(ref, model, attn_mask=case.attn_mask)
    grads = gradient_bound(ref, model, dout=case.do, attn_mask=case.attn_mask)
    return ref, (fwd.out + ref.err_bound, grads.dq + ref.dq_err_bound, grads.dk + ref.dk_err_bound,
                 grads.dv + ref.dv_err_bound)


# -- the model --------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_math_model_describes_the_math_backend(dtype):
    m = get_model("math", dtype)
    assert (m.softmax, m.scaling, m.exp_impl, m.tf32) == ("stored", "sqrt-qk", "exact", False)
    assert m.input == m.out == dtype
    assert {m.qk_acc, m.logits, m.exp, m.p, m.pv_acc, m.l_acc} == {"fp32"}
    assert m.exp_rel_err == ATEN_CPU_EXP_REL_ERR and m.acc_rounding == "nearest" and m.div_rel_err == 0
    g = get_model("math+gpu", dtype)
    assert g.exp_impl == "exact" and g.exp_rel_err == CUDA_EXPF_REL_ERR  # expf on natural-log logits
    assert g.acc_rounding == "zero" and g.div_rel_err == DIV_APPROX_REL_ERR and g.name == "math+gpu"
    assert "math" in MODELS_FOR_DTYPE[dtype] and "math+gpu" in MODELS_FOR_DTYPE[dtype]
    assert check_model_name("math+gpu").softmax == "stored"


def test_underived_combinations_are_refused():
    with pytest.raises(ValueError, match="softmax must be one of"):
        PrecisionModel(softmax="cached")
    with pytest.raises(ValueError, match="scaling must be one of"):
        PrecisionModel(scaling="sqrt")
    with pytest.raises(ValueError, match="not a derived combination"):
        PrecisionModel(softmax="stored")
    with pytest.raises(ValueError, match="not a derived combination"):
        PrecisionModel(scaling="sqrt-qk")
    with pytest.raises(ValueError, match="exp_impl='exp2'"):
        PrecisionModel(softmax="stored", scaling="sqrt-qk", exp_impl="exp2")
    with pytest.raises(ValueError, match="tf32=True"):
        PrecisionModel(softmax="stored", scaling="sqrt-qk", tf32=True)
    with pytest.raises(ValueError, match="pv_acc='bf16'"):
        PrecisionModel(softmax="stored", scaling="sqrt-qk", pv_acc="bf16")


def test_online_only_paths_refuse_the_math_model():
    case = _inputs("fp16", CONFIGS[0], 0)
    m = get_model("math", "fp16")
    with pytest.raises(ValueError, match="softmax='stored'"):
        na.partial_state(case.q, case.k, case.v, [0, 1], model=m)
    with pytest.raises(ValueError, match="softmax='stored'"):
        na.split_kv_attention(case.q, case.k, case.v, [5, 8], model=m)
    ref = oracle.attention_case(case, keep=True, with_grad=False)
    with pytest.raises(ValueError, match="partition=None"):
        attention_bound(ref, m, partition=[np.arange(5), np.arange(5, 13)])


def test_stored_backward_needs_no_saved_output_but_checks_its_shape():
    case = _inputs("bf16", CONFIGS[0], 1)
    m = get_model("math", "bf16")
    grads = nb.attention_backward(case.q, case.k, case.v, None, None, case.do, model=m)
    out, lse = na.tiled_attention(case.q, case.k, case.v, model=m, return_lse=True)
    again = nb.attention_backward(case.q, case.k, case.v, out, lse, case.do, model=m)
    assert all(np.array_equal(a, b) for a, b in zip(grads, again))
    with pytest.raises(ValueError, match="out must have shape"):
        nb.attention_backward(case.q, case.k, case.v, out[..., :1], lse, case.do, model=m)


# -- the emulation against torch ----------------------------------------------


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_emulation_matches_torch_math_backend(dtype):
    """fp16/bf16: nearly every element bit for bit (what differs is exp's last
    bit and the order of fp32 sums, seen through the final rounding: measured
    99.9% equal, the rest within twice the bound); fp32: the two differ by a
    fraction of the bound (measured at most 0.21)."""
    model = get_model("math", dtype)
    equal = total = 0
    for i, cfg in enumerate(CONFIGS):
        case = _inputs(dtype, cfg, 10 + i)
        got = (na.tiled_attention(case.q, case.k, case.v, **_opts(case), model=model),
               *nb.attention_backward(case.q, case.k, case.v, None, None, case.do, **_opts(case), model=model))
        theirs = _torch_math(case)
        _, allowed = _bounds(case, model)
        for name, a, b, bound in zip(("out", "dq", "dk", "dv"), got, theirs, allowed):
            assert a.shape == b.shape, name
            equal += int((a == b).sum())
            total += a.size
            limit = 2.0 if dtype != "fp32" else 0.5
            assert np.all(np.abs(a - b) <= limit * bound), f"{name}: emulation and torch differ by more than expected"
    if dtype != "fp32":
        assert equal >= 0.98 * total, f"only {equal / total:.2%} of the elements are bitwise equal"


@pytest.mark.parametrize("name", ["math", "math+gpu"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_torch_math_backend_within_bounds(dtype, name):
    model = get_model(name, dtype)
    for i, cfg in enumerate(CONFIGS):
        case = _inputs(dtype, cfg, 20 + i)
        theirs = _torch_math(case)
        ref, allowed = _bounds(case, model)
        for label, got, exact, bound in zip(("out", "dq", "dk", "dv"), theirs, (ref.out, ref.dq, ref.dk, ref.dv),
                                           allowed):
            assert np.all(np.isfinite(bound)), label
            assert np.all(np.abs(got - exact) <= bound), f"{label}: torch's math backend exceeds the {name} bound"


def test_judge_gradients_takes_the_math_model():
    """The stored-softmax bound ignores the saved output and LSE the judge passes."""
    case = _inputs("fp16", CONFIGS[2], 30)
    out, dq, dk, dv = _torch_math(case)
    ref = oracle.attention_case(case, keep=True, with_grad=True)
    verdict = judge_gradients(case, dq, dk, dv, model=get_model("math", "fp16"), out=out,
                              lse=np.zeros(ref.lse.shape), ref=ref)
    assert verdict.verdict == "pass", verdict.reason


# -- what the model assumes about torch ----------------------------------------


def _replica(case, gqa_sum_in_fp32=True, sqrt_scale=True):
    """The math backend's graph written out in torch ops (fp32 inside), its
    backward by autograd to the expanded kv heads, then the group sum in
    fp32 or (a variant the model rules out) after a cast."""
    q, k, v, _ = case.to_torch("cpu")
    dtype = q.dtype
    G = q.shape[1] // k.shape[1]
    qf = q.float().requires_grad_(True)
    ke, ve = (t.float().repeat_interleave(G, 1).requires_grad_(True) for t in (k, v))
    scale = case.scale if case.scale is not None else 1 / math.sqrt(q.shape[-1])
    if sqrt_scale:
        c = math.sqrt(scale)
        s = (qf * c) @ (ke * c).transpose(-1, -2)
    else:
        s = (qf @ ke.transpose(-1, -2)) * scale
    out = torch.softmax(s, -1) @ ve
    out.backward(torch.from_numpy(to_float64(case.do)).float())

    def group(g):
        B, H, N, D = g.shape
        g = g if gqa_sum_in_fp32 else g.to(dtype).float()
        return g.reshape(B, H // G, G, N, D).sum(2)

    return tuple(to_float64(t.to(dtype)) for t in (out, qf.grad, group(ke.grad), group(ve.grad)))


def test_torch_math_backend_graph_is_pinned():
    """torch 2.13 on the CPU, measured bit for bit: q and k are both scaled by
    sqrt(scale) in fp32 after the upcast, and the GQA group sum of dk, dv
    happens in fp32, before the one cast to the input dtype."""
    case = _inputs("fp16", (1, 4, 2, 20, 24, 8, {}), 40)
    theirs = _torch_math(case)
    mine = _replica(case)
    assert all(np.array_equal(a, b) for a, b in zip(theirs, mine))
    cast_first = _replica(case, gqa_sum_in_fp32=False)
    assert not np.array_equal(theirs[2], cast_first[2]) and not np.array_equal(theirs[3], cast_first[3])
    fp32 = _inputs("fp32", (1, 2, 2, 9, 13, 8, {}), 41)  # 1/sqrt(8): sqrt(scale) is not exact
    assert np.array_equal(_torch_math(fp32)[0], _replica(fp32)[0])
    assert not np.array_equal(_torch_math(fp32)[0], _replica(fp32, sqrt_scale=False)[0])
