"""Bitwise snapshot of the Triton kernel's forward and backward, for refactors.

Runs `flashcheck.kernels.triton_flash.attention` (forward, LSE, and dq, dk,
dv) on a fixed grid of cases under the CPU interpreter and writes every
result's raw bits to an .npz; ``--check`` recomputes and asserts that each
array is bitwise equal to the saved one. A refactor of the kernels that
claims to change no arithmetic must pass ``--check`` against a snapshot
taken before it.

    TRITON_INTERPRET=1 python scripts/kernel_bitwise.py --save /tmp/before.npz
    TRITON_INTERPRET=1 python scripts/kernel_bitwise.py --check /tmp/before.npz
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flashcheck.kernels.triton_flash import attention  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _cases():
    """(name, spec) pairs; spec keys: B, H, Hkv, Nq, Nk, D, dtype, and the
    options causal, mask ("bool"/"add"/None, with its shape), strided, blocks."""
    cases = []
    for dt in DTYPES:
        cases += [
            (f"{dt}-plain", dict(B=1, H=2, Hkv=2, Nq=20, Nk=20, D=16, dtype=dt)),
            (f"{dt}-causal-odd", dict(B=2, H=1, Hkv=1, Nq=19, Nk=23, D=12, dtype=dt, causal=True)),
            (f"{dt}-boolmask", dict(B=1, H=2, Hkv=2, Nq=17, Nk=13, D=8, dtype=dt, mask="bool",
                                    mask_shape=(1, 2, 17, 13))),
            (f"{dt}-addmask-bcast", dict(B=2, H=2, Hkv=2, Nq=9, Nk=21, D=16, dtype=dt, mask="add",
                                         mask_shape=(9, 21))),
            (f"{dt}-gqa", dict(B=1, H=4, Hkv=2, Nq=18, Nk=15, D=20, dtype=dt)),
            (f"{dt}-gqa-causal-strided", dict(B=2, H=4, Hkv=1, Nq=21, Nk=21, D=16, dtype=dt, causal=True,
                                              strided=True)),
            (f"{dt}-blocks-32x8", dict(B=1, H=1, Hkv=1, Nq=40, Nk=37, D=16, dtype=dt, causal=True,
                                       blocks=(32, 8))),
            (f"{dt}-blocks-4x16-mask", dict(B=1, H=2, Hkv=1, Nq=11, Nk=30, D=4, dtype=dt, mask="bool",
                                            mask_shape=(1, 1, 11, 30), blocks=(4, 16))),
            (f"{dt}-blocks-1x2-tiny", dict(B=1, H=1, Hkv=1, Nq=3, Nk=5, D=1, dtype=dt, blocks=(1, 2))),
        ]
    return cases


def _inputs(spec, seed):
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[spec["dtype"]]
    B, H, Hkv, Nq, Nk, D = (spec[x] for x in ("B", "H", "Hkv", "Nq", "Nk", "D"))

    def make(shape):
        if spec.get("strided"):  # a non-contiguous view: (B, N, H, D) storage, head dim padded
            big = torch.randn((shape[0], shape[2], shape[1], shape[3] + 3), generator=g)
            return big.to(dt)[..., :shape[3]].transpose(1, 2)
        return torch.randn(shape, generator=g).to(dt)

    q, k, v = make((B, H, Nq, D)), make((B, Hkv, Nk, D)), make((B, Hkv, Nk, D))
    do = torch.randn((B, H, Nq, D), generator=g).to(dt)
    mask = None
    if spec.get("mask") == "bool":
        mask = torch.rand(spec["mask_shape"], generator=g) < 0.7
        mask[..., 0, :] = False  # one fully masked row
    elif spec.get("mask") == "add":
        mask = (torch.randn(spec["mask_shape"], generator=g) * 2).to(dt)
        mask[..., 1, 2:] = float("-inf")
    return q, k, v, do, mask


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    view = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.view(view).numpy().copy()


def run_all(log=print) -> dict:
    results = {}
    for i, (name, spec) in enumerate(_cases()):
        q, k, v, do, mask = _inputs(spec, seed=i)
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        bm, bn = spec.get("blocks", (None, None))
        out, lse = attention(q, k, v, attn_mask=mask, is_causal=spec.get("causal", False),
                             enable_gqa=spec["H"] != spec["Hkv"], return_lse=True, block_m=bm, block_n=bn)
        out.backward(do)
        for key, t in (("out", out), ("lse", lse), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            results[f"{name}/{key}"] = _bits(t)
        if log:
            log(f"{name}: done")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", metavar="NPZ")
    group.add_argument("--check", metavar="NPZ")
    args = parser.parse_args(argv)
    results = run_all()
    if args.save:
        np.savez(args.save, **results)
        print(f"saved {len(results)} arrays to {args.save}")
        return 0
    saved = np.load(args.check)
    bad = [key for key in saved.files if key not in results or not np.array_equal(saved[key], results[key])]
    missing = sorted(set(results) - set(saved.files))
    print(f"compared {len(saved.files)} arrays bit for bit: {len(bad)} differ, {len(missing)} new")
    for key in bad:
        print(f"  DIFFERS: {key}")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
