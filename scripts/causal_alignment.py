"""Which causal alignment does each SDPA backend use when Nq != Nk?

SDPA's documented convention is top-left (query i sees keys j <= i). Prints,
per backend, the max difference from the math backend and the count of NaN
outputs, for Nq > Nk and Nq < Nk, in fp16 on the GPU."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa


def run(backend, q, k, v):
    try:
        with sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=True)
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:60]


torch.manual_seed(0)
for nq, nk in ((96, 48), (48, 96), (64, 64)):
    q = torch.randn(1, 2, nq, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 2, nk, 64, device="cuda", dtype=torch.float16)
    v = torch.randn(1, 2, nk, 64, device="cuda", dtype=torch.float16)
    ref = run(SDPBackend.MATH, q, k, v).float()
    rows = torch.arange(nq, device="cuda")[:, None]
    cols = torch.arange(nk, device="cuda")[None, :]
    bottom_right = torch.where(cols <= rows - (nq - nk), 0.0, float("-inf"))
    br = torch.softmax(q.float() @ k.float().transpose(-1, -2) / 8 + bottom_right, -1).nan_to_num() @ v.float()
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        out = run(backend, q, k, v)
        if isinstance(out, str):
            print(f"Nq={nq} Nk={nk} {backend.name}: unsupported ({out})")
            continue
        out = out.float()
        nan = int(out.isnan().sum())
        d_top = float((out.nan_to_num() - ref).abs().max())
        d_bottom = float((out.nan_to_num() - br).abs().max())
        print(f"Nq={nq} Nk={nk} {backend.name}: NaN {nan}, max|out - top-left math| {d_top:.3g}, "
              f"max|out - bottom-right| {d_bottom:.3g}")
