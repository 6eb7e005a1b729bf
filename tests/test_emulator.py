"""The SIMT emulator (csrc/emu) itself: its PTX fragment layouts against CUTLASS's CuTe layouts,
its collectives against their definitions, and every class of kernel bug it promises to report
(csrc/emu/selftest/harness_selftest.cu holds one deliberate bug per hazard mode).

Runs in the emulator process (CROSSHEAD_CUDA_EMULATOR=1; tools/test.sh runs it so)."""

import pytest
import torch

from crosshead import _library

pytestmark = pytest.mark.skipif(not _library.emulated, reason="the SIMT emulator is off: run with "
                                "CROSSHEAD_CUDA_EMULATOR=1 (tools/test.sh does)")
ops = torch.ops.crosshead_emu_selftest if _library.emulated else None


# ------------------------------------------------------------ fragment layouts (CuTe notation)
# CUTLASS cute/atom/mma_traits_sm80.hpp, written as ((thread shape), (value shape)) : (strides):
# a (thread, value) pair maps to a column-major index of the M×K (A), N×K (B) or M×N (C) matrix.
def cute(shape, stride):
    def index(thread, value):
        (t0, t1), vs = shape
        (s0, s1), vstride = stride
        i = (thread % t0) * s0 + (thread // t0) * s1
        for n, s in zip(vs, vstride):
            i += (value % n) * s
            value //= n
        return i
    return index


C_ROW = cute(((4, 8), (2, 2)), ((32, 1), (16, 8)))                    # SM80_16x8_Row, M=16 N=8
LAYOUTS = {  # kind: (K, A layout, B layout)
    0: (8, cute(((4, 8), (2, 2)), ((16, 1), (8, 64))), cute(((4, 8), (2,)), ((8, 1), (32,)))),       # tf32 m16n8k8
    1: (16, cute(((4, 8), (2, 2, 2)), ((32, 1), (16, 8, 128))), cute(((4, 8), (2, 2)), ((16, 1), (8, 64)))),  # bf16
    2: (16, cute(((4, 8), (2, 2, 2)), ((32, 1), (16, 8, 128))), cute(((4, 8), (2, 2)), ((16, 1), (8, 64)))),  # f16
}


def as_bits16(x, dtype):
    return x.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["tf32_m16n8k8", "bf16_m16n8k16", "f16_m16n8k16"])
def test_mma_fragment_layouts_match_cute(kind):
    K, a_layout, b_layout = LAYOUTS[kind]
    A, B, C = torch.randn(16, K), torch.randn(K, 8), torch.randn(16, 8)
    if kind == 0:
        A, B = (x.view(torch.int32).bitwise_and(-8192).view(torch.float32) for x in (A, B))  # exact in TF32
        a_el = A.t().reshape(-1).view(torch.int32)   # column-major M×K
        b_el = B.reshape(-1).view(torch.int32)       # N×K column-major = K×N row-major
        afrag = torch.stack([torch.stack([a_el[a_layout(t, v)] for v in range(4)]) for t in range(32)])
        bfrag = torch.stack([torch.stack([b_el[b_layout(t, v)] for v in range(2)]) for t in range(32)])
    else:
        dtype = torch.bfloat16 if kind == 1 else torch.float16
        A, B = A.to(dtype).float(), B.to(dtype).float()
        a_el, b_el = as_bits16(A.t().reshape(-1), dtype), as_bits16(B.reshape(-1), dtype)

        def pack(el, layout, t, r):  # register r holds values 2r (low half) and 2r + 1
            return el[layout(t, 2 * r)] | (el[layout(t, 2 * r + 1)] << 16)
        afrag = torch.tensor([[pack(a_el, a_layout, t, r) for r in range(4)] for t in range(32)], dtype=torch.int64)
        bfrag = torch.tensor([[pack(b_el, b_layout, t, r) for r in range(2)] for t in range(32)], dtype=torch.int64)
        afrag, bfrag = (torch.where(f >= 2**31, f - 2**32, f).to(torch.int32) for f in (afrag, bfrag))
    c_el = C.t().reshape(-1)
    cfrag = torch.stack([torch.stack([c_el[C_ROW(t, v)] for v in range(4)]) for t in range(32)])
    dfrag = ops.mma(afrag, bfrag, cfrag, kind)
    D = torch.empty(16 * 8)
    for t in range(32):
        for v in range(4):
            D[C_ROW(t, v)] = dfrag[t, v]
    want = A.double() @ B.double() + C.double()
    torch.testing.assert_close(D.view(8, 16).t().double(), want, rtol=1e-6, atol=1e-6)


def test_mma_rounds_tf32_operands_by_truncation():
    """The hardware ignores the low 13 mantissa bits of a TF32 operand: so does the emulator."""
    _, a_layout, b_layout = LAYOUTS[0]
    A = torch.full((16, 8), 1.0 + 2.0**-12)  # below TF32 precision
    B = torch.eye(8)
    a_el, b_el = A.t().reshape(-1).view(torch.int32), B.reshape(-1).view(torch.int32)
    afrag = torch.stack([torch.stack([a_el[a_layout(t, v)] for v in range(4)]) for t in range(32)])
    bfrag = torch.stack([torch.stack([b_el[b_layout(t, v)] for v in range(2)]) for t in range(32)])
    assert (ops.mma(afrag, bfrag, torch.zeros(32, 4), 0) == 1.0).all()


@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix(count, trans):
    m = torch.randint(-2**15, 2**15, (count * 8, 8), dtype=torch.int16)
    regs = ops.ldmatrix(m, count, trans).to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        for i in range(count):
            M = m[8 * i: 8 * i + 8]
            M = M.t() if trans else M
            r, c = lane // 4, 2 * (lane % 4)  # PTX ISA: lane l holds row l/4, columns 2(l%4), 2(l%4)+1
            want = (int(M[r, c]) & 0xFFFF) | ((int(M[r, c + 1]) & 0xFFFF) << 16)
            assert int(regs[lane, i]) == want, (lane, i)


def test_cp_async_groups_and_zero_fill():
    src = torch.randn(256)
    torch.testing.assert_close(ops.cp_async(src, 0, 16), 2 * src, rtol=0, atol=0)
    torch.testing.assert_close(ops.cp_async(src, 3, 16), src, rtol=0, atol=0)
    got = ops.cp_async(src, 1, 8).view(64, 4)  # first copy keeps 8 of 16 bytes
    want = src.view(64, 4).clone()
    want[:, :2] *= 2
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode,message", [(2, "cp.async into it is still in flight"),
                                          (4, "cp.async copies never waited for")])
def test_cp_async_misuse_is_reported(mode, message):
    with pytest.raises(RuntimeError, match=message):
        ops.cp_async(torch.randn(256), mode, 16)


def test_collectives():
    x = torch.randn(64) * 2
    out = ops.collectives(x)
    lanes = torch.arange(64)
    base = lanes - lanes % 32
    lane = lanes % 32
    torch.testing.assert_close(out[:, 0], x[base + (lane ^ 5)])
    torch.testing.assert_close(out[:, 1], x[torch.where(lane >= 3, lanes - 3, lanes)])
    torch.testing.assert_close(out[:, 2], x[torch.where(lane + 7 < 32, lanes + 7, lanes)])
    torch.testing.assert_close(out[:, 3], x[lanes - lanes % 16 + 9])
    for w in range(2):
        xs = x[32 * w: 32 * w + 32]
        ballot = sum(1 << i for i in range(16) if xs[i] > 0)
        assert (out[32 * w: 32 * w + 32, 4] == ballot).all()
        assert (out[32 * w: 32 * w + 32, 5] == float((xs > 2.5).any())).all()
        assert (out[32 * w: 32 * w + 32, 6] == 1.0).all()
        torch.testing.assert_close(out[32 * w: 32 * w + 32, 7], xs.sum().expand(32), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- reported hazards
SMEM = 64 * 4  # the hazard kernel's dynamic shared memory: one float per thread


def hazard(mode, blocks=1, smem=SMEM, opt_in=False):
    return ops.hazard(torch.randn(64), mode, blocks, smem, opt_in)


def test_correct_kernels_run_clean_and_deterministic():
    x = torch.randn(64)
    out = ops.hazard(x, 0, 3, SMEM, False).view(3, 64)
    want = x.roll(-1) + 2 * x.roll(1)
    for b in range(3):
        torch.testing.assert_close(out[b], want, rtol=0, atol=0)
    assert torch.equal(ops.hazard(x, 0, 3, SMEM, False), ops.hazard(x, 0, 3, SMEM, False))
    torch.testing.assert_close(ops.hazard(x, 6, 1, SMEM, False), x.view(-1, 2).flip(1).reshape(-1), rtol=0, atol=0)
    assert (ops.hazard(x, 15, 1, SMEM, False) == float((x > 0).sum())).all()
    atom = ops.hazard(x, 14, 4, SMEM, False)
    assert atom[0] == 4 * 64 and (atom[1:5] == 64).all()


@pytest.mark.parametrize("mode,message", [
    (1, r"race on dynamic shared memory .*\[read after write\]"),
    (2, r"read of uninitialised dynamic shared memory"),
    (3, r"race on dynamic shared memory .*\[write after write\]"),
    (4, r"race on dynamic shared memory .*\[write after read\]"),
    (5, r"race on dynamic shared memory .*\[read after write\]|read of uninitialised dynamic shared memory"),
    (7, r"out-of-bounds read of 4 bytes at dynamic shared memory .* 256 bytes of dynamic shared memory"),
    (8, r"out-of-bounds read of 4 bytes: .*bytes past the end of a 256-byte tensor allocation"),
    (9, r"misaligned 16-byte vector access at dynamic shared memory"),
    (10, r"__syncthreads at .* reached while 32 thread\(s\) of the block have exited|divergent __syncthreads"),
    (11, r"lane 16 of the mask has exited"),
    (12, r"__trap\(\)"),
], ids=["raw", "uninit", "waw", "war", "warp_raw", "oob_shared", "oob_global", "misaligned", "divergent_barrier",
        "exited_lane", "trap"])
def test_hazard_is_reported_with_kernel_block_and_thread(mode, message):
    with pytest.raises(RuntimeError, match=message) as err:
        hazard(mode)
    text = str(err.value)
    assert "kernel crosshead_selftest::{anonymous}::hazard_kernel, block (0, 0, 0)" in text
    assert mode in (10, 11) or "thread (" in text  # barrier and collective errors name the waiting threads


def test_race_between_blocks_is_reported():
    with pytest.raises(RuntimeError, match=r"race on global memory .* blocks are not ordered"):
        hazard(13, blocks=2)


def test_dynamic_shared_memory_over_48_kib_needs_the_attribute():
    with pytest.raises(RuntimeError, match="cudaFuncSetAttribute"):
        hazard(0, smem=64 * 1024)
    out = hazard(0, smem=64 * 1024, opt_in=True)  # the kernel's limit is raised from here on
    assert torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="1024 threads|rejected"):
        hazard(0, smem=300 * 1024, opt_in=True)


def test_info_says_which_kernels_serve_the_cpu():
    from crosshead.info import report

    text = report()
    assert "CUDA emulator: " in text
    for dtype in ("float32", "float16", "bfloat16"):
        assert f"cpu   {dtype:<9} CUDA kernel sources on the SIMT emulator" in text
    assert "cpu   float64   unavailable" in text


def test_kernels_are_served_from_the_cuda_sources():
    for op in ("imhsa", "imhsa_backward", "landmarks", "landmarks_backward"):
        line = [s for s in torch._C._dispatch_dump(f"crosshead::{op}").splitlines() if s.startswith("CPU:")][0]
        assert "/cuda/" in line and ".cu:" in line, line


def test_split_grids_fit_in_one_wave(monkeypatch):
    """cuda_audit.md §2.10 #2: the split kernels' grids (splits × B CTAs) must fit in one wave of
    resident CTAs (occupancy × SMs), not spill a nearly empty second wave. The emulated device's
    occupancy counts threads and shared memory (1 KiB reserved per CTA, 228 KiB and 2048 threads per
    SM); a GPU also counts registers, which only a GPU run can check."""
    sms, B, h = 4, 3, 8  # h = 8, L = 49, d = 64: the backward kernels fit 2 CTAs per SM (~100 KB each)
    monkeypatch.setenv("CROSSHEAD_CUDA_EMULATOR_SMS", str(sms))
    q, k, v = (torch.randn(B, h, 61, 64) for _ in range(3))
    q_land, k_land = (torch.randn(B, h, 49, 64) for _ in range(2))
    w = [torch.eye(h) + 0.3 * torch.randn(h, h) for _ in range(2)]
    ops.launch_log(True)
    out = torch.ops.crosshead.imhsa(q, k, v, q_land, k_land, *w, "post", 0.2)
    torch.ops.crosshead.imhsa_backward(torch.randn_like(q), q, k, v, q_land, k_land, *w, *out[1:], "post", 0.2)
    split_kernels = ("key_stats_kernel", "key_z_kernel", "key_rowsum_kernel", "key_backward_kernel",
                     "query_backward_kernel")
    seen = set()
    for line in ops.launch_log(True).splitlines():
        name, gx, gy, gz, threads, smem = line.rsplit(" ", 5)
        kernel = next((k for k in split_kernels if k in name), None)
        if kernel is None:
            continue
        seen.add(kernel)
        resident = min(2048 // int(threads), 228 * 1024 // (int(smem) + 1024), 32)
        ctas = int(gx) * int(gy) * int(gz)
        assert int(gy) == B and ctas <= resident * sms, f"{name}: {ctas} CTAs for {resident} × {sms} slots"
    assert seen == set(split_kernels)


def test_load_weights_without_w_is_the_identity():
    """cuda_audit.md §2.10 #3: a null w means no interaction, so the staged weights are the identity."""
    assert torch.equal(ops.load_weights(None, 5), torch.eye(5))
    w = torch.randn(3, 3)
    assert torch.equal(ops.load_weights(w, 3), w)
