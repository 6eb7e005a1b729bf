"""The second-generation kernels (csrc/cuda/query_forward_mma.cu: half types on m16n8k16 tensor
cores): which kernel serves which sizes, and the fast path against the float64 reference within the
error bound of its arithmetic. Runs on a GPU, else on the CPU harness (CROSSHEAD_CUDA_EMULATOR=1),
like tests/test_ops_cuda.py; its deliberately broken versions are in tests/test_emulator_mutations.py.
"""

import pytest
import torch

from crosshead import reference
from kernel_device import DEVICE, EMULATED, skip_without_kernels, sized
from test_ops_cuda import as64, inputs

pytestmark = skip_without_kernels

# Unit roundoff of round-to-nearest: 2^-p for p significant bits.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
U32 = 2.0**-24


def launched(fn):
    """Names of the kernels that fn launches."""
    if EMULATED:
        log = torch.ops.crosshead_emu_selftest.launch_log
        log(True)
        fn()
        return [line.rsplit(" ", 5)[0] for line in log(True).splitlines()]
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


# (dtype, d, h, L, CROSSHEAD_CUDA_TENSOR_CORES, served by the second generation)
ROUTES = [
    (torch.bfloat16, 64, 8, 49, "1", True),
    (torch.float16, 32, 16, 64, "1", True),
    (torch.bfloat16, 128, 1, 1, "1", True),
    (torch.bfloat16, 64, 8, 65, "1", False),  # L > 64
    (torch.float16, 40, 4, 7, "1", False),  # d not in {32, 64, 128}
    (torch.float32, 64, 4, 7, "1", False),  # float32 (TF32 would round the inputs)
    (torch.bfloat16, 64, 4, 7, "0", False),  # tensor cores switched off
]


@pytest.mark.parametrize("dtype,d,h,L,tc,fast", ROUTES, ids=lambda x: str(x))
def test_query_forward_kernel_serving_each_size(dtype, d, h, L, tc, fast, monkeypatch):
    monkeypatch.setenv("CROSSHEAD_CUDA_TENSOR_CORES", tc)
    args = inputs(1, h, 19, d, L, dtype)
    names = launched(lambda: torch.ops.crosshead.imhsa(*args, "post", 0.2))
    second = [n for n in names if "query_forward_mma_kernel" in n]
    first = [n for n in names if "query_forward_kernel" in n]
    assert (bool(second), bool(first)) == (fast, not fast), names


def error_bound(args, ref, z_kernel, mix, dtype):
    """max |out - out_64| allowed for the query side of the fast path. It computes Â_Q in float32,
    rounds Â_Q and Z to dtype (unit roundoff u) for the m16n8k16 product, accumulates Σ_l over L in
    float32, and rounds out to dtype. With A1 = max_g Σ_l |Â_Q[g]| (≤ Σ_h |w[g, h]| in post mode,
    1 in pre mode) and Z the key side's result (its own error |ΔZ| is checked in test_ops_cuda):
        |Δout| ≤ A1·((2u + u² + (L + 64)·u32)·max|Z| + max|ΔZ|) + u·(max|out| + that)
    where (L + 64)·u32 covers the float32 accumulation, softmax and mixing of Â_Q."""
    u = UNIT_ROUNDOFF[dtype]
    L = args[3].shape[2]
    w_q = args[5]
    a1 = 1.0 if mix == "pre" or w_q is None else w_q.double().abs().sum(1).max().item()
    zmax = ref[1].abs().max().item()
    dz = (z_kernel.double() - ref[1]).abs().max().item()
    inner = a1 * ((2 * u + u * u + (L + 64) * U32) * zmax + dz)
    return inner + u * (ref[0].abs().max().item() + inner)


FAST_SHAPES = sized([
    (4, 8, 3136, 64, 49),
    (2, 16, 1001, 32, 64),
    (3, 1, 577, 128, 1),
    (2, 5, 197, 64, 16),
    (1, 12, 4099, 64, 49),
], [  # the emulator: every tile-edge case at fewer tokens
    (2, 3, 37, 64, 9),  # two tiles, the last one partial
    (1, 1, 70, 32, 1),  # L = 1
    (1, 16, 9, 128, 4),  # h = 16, fewer tokens than a warp's rows
    (1, 8, 50, 64, 49),  # the benchmark's h, d, L
    (1, 5, 20, 32, 64),  # L = 64: the largest served
    (1, 9, 17, 64, 16),  # h = 9: the 16-head instantiation with idle heads
])


@pytest.mark.parametrize("shape", FAST_SHAPES, ids=lambda s: "B{}h{}N{}d{}L{}".format(*s))
@pytest.mark.parametrize("interaction", [True, False], ids=["w", "no_w"])
@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_query_forward_within_its_error_bound(shape, interaction, mix, dtype):
    args = inputs(*shape, dtype, interaction=interaction)
    assert any("query_forward_mma_kernel" in n
               for n in launched(lambda: torch.ops.crosshead.imhsa(*args, mix, 0.2))), "not the fast path"
    ref = reference.imhsa(*as64(args), mix, 0.2)
    out, z, lse_k, lse_q = torch.ops.crosshead.imhsa(*args, mix, 0.2)
    assert torch.isfinite(out).all() and torch.isfinite(lse_q).all(), "unwritten (NaN) outputs"
    err = (out.double() - ref[0]).abs().max().item()
    bound = error_bound(args, ref, z, mix, dtype)
    assert err <= bound, f"out: max abs error {err:.3e} > bound {bound:.3e}"
    # lse_q = logsumexp of float32 sums of exact products of dtype values: float32 rounding only
    d = args[0].shape[-1]
    lse_err = (lse_q.double() - ref[3]).abs().max().item()
    lse_bound = (d + 64) * U32 * (1 + ref[3].abs().max().item() + 0.2 * d * max(
        args[0].double().abs().max().item() * args[4].double().abs().max().item(), 1.0))
    assert lse_err <= lse_bound, f"lse_q: max abs error {lse_err:.3e} > bound {lse_bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_query_forward_is_layout_independent(dtype):
    """q read through its strides (a (B, N, h, d) buffer seen as (B, h, N, d)) or copied first (an
    offset that breaks 16-byte alignment) gives bitwise the result of a contiguous q."""
    B, h, N, d, L = 2, 4, 45, 64, 9
    args = inputs(B, h, N, d, L, dtype)
    want = torch.ops.crosshead.imhsa(*args, "post", 0.2)
    bnhd = args[0].transpose(1, 2).contiguous().transpose(1, 2)
    assert not bnhd.is_contiguous()
    flat = torch.empty(args[0].numel() + 1, device=DEVICE, dtype=dtype)
    shifted = flat[1:].view_as(args[0])
    shifted.copy_(args[0])
    for q in (bnhd, shifted):
        got = torch.ops.crosshead.imhsa(q, *args[1:], "post", 0.2)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
