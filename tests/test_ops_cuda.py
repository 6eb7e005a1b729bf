"""The fused CUDA kernels (csrc/cuda/) against the float64 pure-torch reference.

Runs on a GPU when there is one, else on the CPU harness (CROSSHEAD_CUDA_EMULATOR=1: the same
kernel sources on the SIMT emulator, at smaller shapes; tools/test.sh runs this file so), else is
skipped with the reason. Where the kernels should run but are not registered (a pure-torch
registration only), every test FAILS: a broken build must never pass as green. Outputs start as NaN
(the CUDA caching allocator is filled with NaN first; the emulator's allocator fills every
allocation), so an element a kernel forgets to write shows up as NaN.
"""

import math

import pytest
import torch

import crosshead
from crosshead import _library, reference
from kernel_device import DEVICE, GPU, KEY, WHERE, fused_kernel_registered, gpu_only, sized, skip_without_kernels

pytestmark = skip_without_kernels

OPS = ("imhsa", "imhsa_backward", "landmarks", "landmarks_backward")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# max |kernel - float64 reference| <= TOL·(1 + max|reference|) per compared tensor. The kernels
# compute in float32 (fast-math exp); half-type results carry one rounding to the dtype.
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (B, h, N, d, L): odd N everywhere, every fast-path d and odd ones, h in {1, 8, 16}, L in {1, 49, 256}.
SHAPES = sized([
    (2, 8, 197, 64, 49),
    (1, 1, 33, 32, 1),
    (3, 16, 129, 128, 16),
    (2, 4, 77, 40, 7),
    (1, 2, 51, 256, 5),
    (2, 3, 301, 64, 256),
], [  # the emulator: the same coverage of h, d and L at fewer tokens
    (2, 3, 37, 64, 9),
    (1, 1, 33, 32, 1),
    (1, 16, 9, 128, 4),
    (2, 4, 21, 40, 7),
    (1, 2, 11, 256, 5),
    (1, 2, 13, 8, 256),
])


@pytest.fixture(autouse=True)
def _require_fused_kernels():
    missing = [op for op in OPS if not fused_kernel_registered(op)]
    if missing or (GPU and _library.mode not in ("compiled", "jit", "preloaded")):
        pytest.fail(f"the fused kernels should run on the {WHERE} but are not registered for {missing} "
                    f"(library mode {_library.mode!r}: {_library.detail}); build the extension "
                    "(pip install --no-build-isolation -e . or CROSSHEAD_JIT=1)")


def poison_cache():
    """Fill blocks of the caching allocator with NaN and hand them back, so tensors the kernels
    allocate with at::empty start out as NaN rather than as stale finite values or zeros. (The
    emulator's CPU allocator fills every new allocation with NaN itself.)"""
    if not GPU:
        return
    keep = []
    for numel in [2**k for k in range(6, 19)] * 4 + [2**22] * 4 + [2**25] * 2:
        keep.append(torch.full((numel,), float("nan"), device="cuda"))
    del keep


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float64) * scale).to(dtype)


def inputs(B, h, N, d, L, dtype, interaction=True, w_dtype=None):
    q, k, v = (rand(B, h, N, d, dtype=dtype) for _ in range(3))
    q_land, k_land = (rand(B, h, L, d, dtype=dtype) for _ in range(2))
    w = [None, None]
    if interaction:
        w = [(torch.eye(h, device=DEVICE, dtype=torch.float64)
              + 0.3 * torch.randn(h, h, device=DEVICE, dtype=torch.float64)).to(w_dtype or dtype) for _ in range(2)]
    return [q, k, v, q_land, k_land, *w]


def as64(ts):
    return [None if t is None else t.detach().to(torch.float64) for t in ts]


def check(name, got, want, dtype):
    assert got is not None and want is not None, name
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got64 = got.detach().to(torch.float64)
    assert torch.isfinite(got64).all(), f"{name}: non-finite values (an unwritten or overflowed output)"
    err = (got64 - want).abs().max().item() if want.numel() else 0.0
    bound = TOL[dtype] * (1 + (want.abs().max().item() if want.numel() else 0.0))
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e} ({dtype})"


def run_and_check(args, mix, scale, dtype):
    """Forward and backward ops on CUDA against the float64 reference, all outputs and gradients."""
    ref = reference.imhsa(*as64(args), mix, scale)
    g = rand(*args[0].shape, dtype=dtype)
    poison_cache()
    out = torch.ops.crosshead.imhsa(*args, mix, scale)
    for name, got, want in zip(("out", "z", "lse_k", "lse_q"), out, ref):
        check(name, got, want, dtype)
    assert out[0].dtype == dtype and out[0].is_contiguous()
    assert all(t.dtype == torch.float32 for t in out[1:])
    ref_grads = reference.imhsa_backward(g.to(torch.float64), *as64(args), *ref[1:], mix, scale)
    poison_cache()
    grads = torch.ops.crosshead.imhsa_backward(g, *args, *out[1:], mix, scale)
    names = ("grad_q", "grad_k", "grad_v", "grad_q_land", "grad_k_land", "grad_w_q", "grad_w_k")
    for i, name in enumerate(names):
        if i >= 5 and args[i] is None:
            assert grads[i].numel() == 0, f"{name} must be empty without w"
            continue
        check(name, grads[i], ref_grads[i], dtype)
        assert grads[i].dtype == args[i].dtype and grads[i].is_contiguous(), name


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}h{}N{}d{}L{}".format(*s))
@pytest.mark.parametrize("interaction", [True, False], ids=["w", "no_w"])
@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(shape, interaction, mix, dtype):
    args = inputs(*shape, dtype=dtype, interaction=interaction)
    run_and_check(args, mix, shape[3] ** -0.5, dtype)


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_interaction_with_half_inputs(mix, dtype):
    args = inputs(*sized((2, 8, 99, 64, 12), (1, 4, 19, 64, 6)), dtype=dtype, w_dtype=torch.float32)
    run_and_check(args, mix, 0.3, dtype)


@pytest.mark.parametrize("mix", ["post", "pre"])
def test_large_n_and_custom_scale(mix):
    args = inputs(*sized((2, 8, 3137, 64, 49), (1, 2, 301, 32, 49)), dtype=torch.bfloat16)
    run_and_check(args, mix, 0.2, torch.bfloat16)


# Shapes where a split CTA loops over several tiles (pick_splits aims at ~2 CTAs per SM, so the
# shapes above mostly get one tile per split): exercises the cross-tile accumulation (the `first`
# flag, the running (max, Σexp) merge, dw accumulation) and the shared-memory reuse across tiles.
# (B, h, N, d, L): B=16 leaves ~17 splits for >= 24 tiles; h=16, L=256 gives tiles of 1-2 tokens.
# The emulated device gets 2 SMs here, so small inputs already loop over several tiles per split.
@pytest.mark.parametrize("shape", sized([(16, 4, 1501, 64, 49), (16, 3, 997, 40, 7), (2, 16, 301, 32, 256)],
                                        [(2, 4, 201, 32, 9), (2, 3, 157, 40, 7), (1, 16, 11, 32, 256)]),
                         ids=lambda s: "B{}h{}N{}d{}L{}".format(*s))
@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_several_tiles_per_split(shape, mix, dtype, monkeypatch):
    monkeypatch.setenv("CROSSHEAD_CUDA_EMULATOR_SMS", "2")
    args = inputs(*shape, dtype=dtype)
    run_and_check(args, mix, shape[3] ** -0.5, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    B, h, N, d, L = sized((2, 6, 145, 64, 9), (1, 3, 17, 64, 5))
    qkv = rand(B, N, 3, h, d, dtype=dtype).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d), token-strided
    q, k, v = qkv.unbind(0)
    q_land = rand(B, L, h, d, dtype=dtype).transpose(1, 2)
    k_land = rand(B, h, d, L, dtype=dtype).transpose(2, 3)  # d not unit-stride: copied internally
    w_q = (torch.eye(h, device=DEVICE) + 0.2 * torch.randn(h, h, device=DEVICE)).to(dtype).t()
    w_k = torch.randn(h, h, device=DEVICE).to(dtype)[:, :]
    assert not q.is_contiguous() and not k_land.is_contiguous()
    for mix in ("post", "pre"):
        run_and_check([q, k, v, q_land, k_land, w_q, w_k], mix, d ** -0.5, dtype)
    v_wide = rand(B, h, N, 2 * d, dtype=dtype)[..., ::2]  # non-unit stride over d
    run_and_check([q, k, v_wide, q_land, k_land, None, w_k], "post", d ** -0.5, dtype)
    # contiguous but at an odd storage offset (not 16-byte aligned)
    q_land_odd = rand(B * h * L * d + 1, dtype=dtype)[1:].view(B, h, L, d)
    run_and_check([q, k, v, q_land_odd, k_land, w_q, None], "pre", d ** -0.5, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grid,size,prefix", [((14, 14), (7, 7), 0), ((13, 11), (5, 4), 1), ((7, 9), (7, 2), 4),
                                              (None, 49, 0), (None, 13, 3), (None, 1, 0)])
def test_landmarks_match_reference(dtype, grid, size, prefix):
    B, h, d = 2, 3, 40
    n = (grid[0] * grid[1] if grid else 101) + prefix
    x = rand(B, n, h, d, dtype=dtype).transpose(1, 2)  # non-contiguous
    grid_l = list(grid) if grid else []
    size_l = list(size) if grid else [size]
    poison_cache()
    out = torch.ops.crosshead.landmarks(x, grid_l, size_l, prefix)
    check("landmarks", out, reference.landmarks(x.to(torch.float64), grid_l, size_l, prefix), dtype)
    g = rand(*out.shape, dtype=dtype)
    poison_cache()
    dx = torch.ops.crosshead.landmarks_backward(g, n, grid_l, size_l, prefix)
    check("landmarks_backward", dx, reference.landmarks_backward(g.to(torch.float64), n, grid_l, size_l, prefix),
          dtype)
    assert dx[:, :, :prefix].eq(0).all()


@pytest.mark.parametrize("mix", ["post", "pre"])
def test_autograd_through_public_api(mix):
    B, h, H, W, d = 2, 4, 9, 7, 32
    x = rand(B, h, 1 + H * W, d, dtype=torch.float32)
    q, k, v = (x + 0.1 * rand(*x.shape, dtype=torch.float32) for _ in range(3))
    w_q, w_k = (torch.eye(h, device=DEVICE) + 0.1 * torch.randn(h, h, device=DEVICE) for _ in range(2))
    leaves = [t.requires_grad_() for t in (q, k, v, w_q, w_k)]

    def f(q, k, v, w_q, w_k, lib):
        ql = lib.landmarks(q, grid=(H, W), size=(3, 4), prefix=1)
        kl = lib.landmarks(k, grid=(H, W), size=(3, 4), prefix=1)
        return lib.imhsa(q, k, v, ql, kl, w_q, w_k, mix=mix)

    out = f(*leaves, crosshead)
    out.backward(torch.ones_like(out))
    got = [t.grad for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]

    class Ref:
        @staticmethod
        def landmarks(x, grid, size, prefix):
            return reference.landmarks(x, list(grid), list(size), prefix)

        @staticmethod
        def imhsa(q, k, v, ql, kl, w_q, w_k, mix):
            return reference.imhsa(q, k, v, ql, kl, w_q, w_k, mix, q.shape[-1] ** -0.5)[0]

    ref_out = f(*ref_leaves, Ref)
    ref_out.backward(torch.ones_like(ref_out))
    check("out", out, ref_out.detach(), torch.float32)
    for name, g, r in zip(("q", "k", "v", "w_q", "w_k"), got, ref_leaves):
        check(f"grad_{name}", g, r.grad, torch.float32)


def test_backward_is_bitwise_deterministic():
    for mix in ("post", "pre"):
        args = inputs(*sized((3, 8, 1001, 64, 49), (2, 4, 67, 64, 9)), dtype=torch.bfloat16)
        out = torch.ops.crosshead.imhsa(*args, mix, 0.125)
        out2 = torch.ops.crosshead.imhsa(*args, mix, 0.125)
        assert all(torch.equal(a, b) for a, b in zip(out, out2)), "forward differs between runs"
        g = rand(*args[0].shape, dtype=torch.bfloat16)
        first = torch.ops.crosshead.imhsa_backward(g, *args, *out[1:], mix, 0.125)
        poison_cache()
        second = torch.ops.crosshead.imhsa_backward(g, *args, *out[1:], mix, 0.125)
        for i, (a, b) in enumerate(zip(first, second)):
            assert torch.equal(a, b), f"gradient {i} differs bitwise between two runs ({mix})"


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("interaction", [True, False], ids=["w", "no_w"])
def test_opcheck_cuda(mix, interaction):
    args = inputs(2, 4, 37, 32, 5, dtype=torch.float32, interaction=interaction)
    torch.library.opcheck(torch.ops.crosshead.imhsa.default, (*args, mix, 0.2))
    grad_args = [t.clone().requires_grad_() if t is not None else None for t in args]
    torch.library.opcheck(torch.ops.crosshead.imhsa.default, (*grad_args, mix, 0.2))
    out = torch.ops.crosshead.imhsa(*args, mix, 0.2)
    g = rand(*args[0].shape, dtype=torch.float32)
    torch.library.opcheck(torch.ops.crosshead.imhsa_backward.default, (g, *args, *out[1:], mix, 0.2))


@pytest.mark.parametrize("grid,size,prefix", [([6, 5], [3, 2], 2), ([], [7], 1)])
def test_opcheck_landmarks_cuda(grid, size, prefix):
    x = rand(2, 3, prefix + 30, 16, dtype=torch.float32)
    torch.library.opcheck(torch.ops.crosshead.landmarks.default, (x, grid, size, prefix))
    torch.library.opcheck(torch.ops.crosshead.landmarks.default,
                          (x.clone().requires_grad_(), grid, size, prefix))
    g = rand(2, 3, math.prod(size), 16, dtype=torch.float32)
    torch.library.opcheck(torch.ops.crosshead.landmarks_backward.default, (g, prefix + 30, grid, size, prefix))


@pytest.mark.parametrize("mix", ["post", "pre"])
def test_torch_compile_fullgraph(mix):
    B, h, H, W, d = 2, 4, 8, 8, 32
    backend = "inductor" if GPU else "aot_eager"  # the emulator: the graph, not a CPU codegen, is the point

    def f(q, k, v, w_q, w_k):
        ql = crosshead.landmarks(q, grid=(H, W), size=(4, 4))
        kl = crosshead.landmarks(k, grid=(H, W), size=(4, 4))
        return crosshead.imhsa(q, k, v, ql, kl, w_q, w_k, mix=mix).float().square().sum()

    def leaves():
        torch.manual_seed(0)
        ts = [torch.randn(B, h, H * W, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
        ts += [torch.eye(h, device=DEVICE) + 0.1 * torch.randn(h, h, device=DEVICE) for _ in range(2)]
        return [t.requires_grad_() for t in ts]

    eager_in, comp_in = leaves(), leaves()
    f(*eager_in).backward()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    compiled(*comp_in).backward()
    for a, b in zip(eager_in, comp_in):
        torch.testing.assert_close(b.grad, a.grad, rtol=2e-2, atol=2e-2)


def test_rejects_unsupported_configurations_with_a_clear_message():
    ok = inputs(1, 2, 9, 16, 3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="crosshead.reference"):
        torch.ops.crosshead.imhsa(*[None if t is None else t.double() for t in ok], "post", 0.25)
    big_h = inputs(1, 17, 9, 16, 3, dtype=torch.float32, interaction=False)
    with pytest.raises(RuntimeError, match="h <= 16"):
        torch.ops.crosshead.imhsa(*big_h, "post", 0.25)
    big_d = inputs(1, 2, 9, 264, 3, dtype=torch.float32, interaction=False)
    with pytest.raises(RuntimeError, match="d <= 256"):
        torch.ops.crosshead.imhsa(*big_d, "post", 0.25)
    big_l = inputs(1, 2, 300, 16, 257, dtype=torch.float32, interaction=False)
    with pytest.raises(RuntimeError, match="L <= 256"):
        torch.ops.crosshead.imhsa(*big_l, "post", 0.25)
    with pytest.raises(ValueError, match="mix"):  # argument checks: tests/test_op_checks.py
        torch.ops.crosshead.imhsa(*ok, "sideways", 0.25)
    bad_w = list(ok)
    bad_w[5] = torch.eye(3, device=DEVICE)
    with pytest.raises(ValueError, match="w_q"):
        torch.ops.crosshead.imhsa(*bad_w, "post", 0.25)


def test_empty_batch():
    args = inputs(0, 4, 10, 16, 3, dtype=torch.float16)
    out = torch.ops.crosshead.imhsa(*args, "post", 0.25)
    assert out[0].shape == (0, 4, 10, 16)
    grads = torch.ops.crosshead.imhsa_backward(torch.zeros_like(args[0]), *args, *out[1:], "post", 0.25)
    assert grads[5].shape == (4, 4) and grads[5].eq(0).all()


@gpu_only
def test_runs_on_the_current_stream():
    args = inputs(2, 8, 211, 64, 49, dtype=torch.bfloat16)
    want = torch.ops.crosshead.imhsa(*args, "post", 0.125)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = torch.ops.crosshead.imhsa(*args, "post", 0.125)[0]
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)


# ------------------------------------------------------------------ tensor-core path (half types)
# float16/bfloat16 inputs with d in {32, 64, 128} run the tile products on tensor cores (mma.sync
# TF32, float32 accumulation); CROSSHEAD_CUDA_TENSOR_CORES=0 forces the float32 CUDA-core path.
# The variable is read at every op call, so both paths are checked in one process. TF32 operands
# keep 11 significant bits (as many as float16), so the per-dtype TOL above holds for both paths.
TC_PATHS = {"tensor_cores": "1", "cuda_cores": "0"}


@pytest.fixture(params=sorted(TC_PATHS), ids=str)
def tc_path(request, monkeypatch):
    monkeypatch.setenv("CROSSHEAD_CUDA_TENSOR_CORES", TC_PATHS[request.param])
    return request.param


@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("N", sized([197, 37], [45, 13]), ids=lambda n: f"N{n}")  # the second: a single partial tile
@pytest.mark.parametrize("interaction", [True, False], ids=["w", "no_w"])
@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_core_switch_matches_float64_reference(tc_path, dtype, mix, interaction, N, d):
    args = inputs(sized(2, 1), 4, N, d, 49, dtype=dtype, interaction=interaction)  # L = 49: partial 16-blocks
    run_and_check(args, mix, d ** -0.5, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_core_path_is_bitwise_deterministic(tc_path, dtype):
    for mix in ("post", "pre"):
        args = inputs(*sized((2, 8, 1001, 64, 49), (1, 4, 67, 64, 9)), dtype=dtype)
        out = torch.ops.crosshead.imhsa(*args, mix, 0.125)
        poison_cache()
        out2 = torch.ops.crosshead.imhsa(*args, mix, 0.125)
        assert all(torch.equal(a, b) for a, b in zip(out, out2)), f"forward differs between runs ({tc_path})"
        g = rand(*args[0].shape, dtype=dtype)
        first = torch.ops.crosshead.imhsa_backward(g, *args, *out[1:], mix, 0.125)
        poison_cache()
        second = torch.ops.crosshead.imhsa_backward(g, *args, *out[1:], mix, 0.125)
        for i, (a, b) in enumerate(zip(first, second)):
            assert torch.equal(a, b), f"gradient {i} differs bitwise between two runs ({mix}, {tc_path})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_core_switch_selects_the_path(monkeypatch, dtype):
    """The switch is live: with d in {32, 64, 128} the two paths sum in different orders, so the
    float32 z differs in its low bits; with another d, or float32 inputs, both settings run the
    same CUDA-core kernels and agree bitwise."""
    def run(setting, args):
        monkeypatch.setenv("CROSSHEAD_CUDA_TENSOR_CORES", setting)
        out = torch.ops.crosshead.imhsa(*args, "post", 0.2)
        g = torch.ones_like(args[0])
        return out, torch.ops.crosshead.imhsa_backward(g, *args, *out[1:], "post", 0.2)

    fast = inputs(*sized((2, 4, 133, 64, 49), (1, 4, 33, 64, 9)), dtype=dtype)
    (out_tc, grads_tc), (out_cc, grads_cc) = run("1", fast), run("0", fast)
    assert not torch.equal(out_tc[1], out_cc[1]), "CROSSHEAD_CUDA_TENSOR_CORES=0 did not change the path"
    for name, a, b in zip(("out", "z"), out_tc, out_cc):
        check(name, a, b.to(torch.float64), dtype)  # the paths agree to the dtype's tolerance
    for i, (a, b) in enumerate(zip(grads_tc, grads_cc)):
        check(f"grad {i}", a, b.to(torch.float64), dtype)
    small, L = sized((2, 4, 133), (1, 4, 33)), sized(49, 9)
    for other in (inputs(*small, 40, L, dtype=dtype), inputs(*small, 64, L, dtype=torch.float32)):
        (o1, g1), (o0, g0) = run("1", other), run("0", other)
        assert all(torch.equal(a, b) for a, b in zip((*o1, *g1), (*o0, *g0))), \
            "the generic path must not depend on CROSSHEAD_CUDA_TENSOR_CORES"


def test_key_logits_of_minus_inf_over_a_whole_tile():
    """Audit (cuda_audit.md §2.10 #1): a tile in which a key-side softmax row is all -inf used to give
    st = Σ exp(-inf - -inf) = NaN, so lse_k and z became NaN while the reference stays finite.
    h = L = 1, d = 32 gives tiles of 64 tokens: N = 65 is two tiles in two splits, the first all -inf."""
    q, k, v = (rand(1, 1, 65, 32, dtype=torch.float32) for _ in range(3))
    k[..., :64, :] = float("-inf")
    q_land = torch.ones(1, 1, 1, 32, device=DEVICE)
    k_land = rand(1, 1, 1, 32, dtype=torch.float32)
    args = [q, k, v, q_land, k_land, None, None]
    ref = reference.imhsa(*as64(args), "post", 32 ** -0.5)
    assert all(torch.isfinite(r).all() for r in ref)
    out = torch.ops.crosshead.imhsa(*args, "post", 32 ** -0.5)
    for name, got, want in zip(("out", "z", "lse_k", "lse_q"), out, ref):
        check(name, got, want, torch.float32)
