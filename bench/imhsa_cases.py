"""The crosshead op-level contenders: the public op (fused kernels or the pure-torch path), the
pure-torch path under torch.compile, and the same math written the obvious way (imhsa-naive)."""

from __future__ import annotations

import torch

from .cases import Case, _no_gpu, _qkv
from .config import Config


def _mixing(cfg: Config, h: int):
    gen = torch.Generator().manual_seed(7)
    w = [torch.eye(h) + 0.1 * torch.randn(h, h, generator=gen) for _ in range(2)]
    return [t.to(cfg.device).requires_grad_() for t in w]


class _ReferenceLandmarks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, size):
        from crosshead import reference
        ctx.n, ctx.grid, ctx.size = x.shape[2], grid, size
        return reference.landmarks(x, grid, size, 0)

    @staticmethod
    def backward(ctx, g):
        from crosshead import reference
        return reference.landmarks_backward(g, ctx.n, ctx.grid, ctx.size, 0), None, None


class _ReferenceImhsa(torch.autograd.Function):
    """The pure-torch forward and hand-written backward of crosshead.reference, bypassing the
    dispatcher: what crosshead.imhsa runs where no fused kernel is registered. Used when a fused
    CUDA kernel is loaded, so that the pure-torch path can still be measured beside it."""

    @staticmethod
    def forward(ctx, q, k, v, ql, kl, wq, wk, mix, scale):
        from crosshead import reference
        out, z, lse_k, lse_q = reference.imhsa(q, k, v, ql, kl, wq, wk, mix, scale)
        ctx.save_for_backward(q, k, v, ql, kl, wq, wk, z, lse_k, lse_q)
        ctx.mix, ctx.scale = mix, scale
        return out

    @staticmethod
    def backward(ctx, g):
        from crosshead import reference
        grads = reference.imhsa_backward(g, *ctx.saved_tensors, ctx.mix, ctx.scale)
        return (*grads, None, None)


def _fused_available() -> bool:
    from crosshead import _library
    return _library.mode in ("compiled", "jit") and _library.has_kernel("imhsa", "CUDA")


def _imhsa_case(cfg: Config, side: int, path: str) -> Case:
    import crosshead
    q, k, v, g = _qkv(cfg, side)
    wq, wk = _mixing(cfg, cfg.heads)
    grid, size, mix = (side, side), cfg.landmarks, cfg.mix
    scale = cfg.head_dim ** -0.5

    if path == "api":  # public API, whatever kernel is registered for the device
        def forward():
            ql, kl = crosshead.landmarks(q, grid, size), crosshead.landmarks(k, grid, size)
            return crosshead.imhsa(q, k, v, ql, kl, wq, wk, mix=mix)
    elif path == "function":
        def forward():
            ql = _ReferenceLandmarks.apply(q, list(grid), list(size))
            kl = _ReferenceLandmarks.apply(k, list(grid), list(size))
            return _ReferenceImhsa.apply(q, k, v, ql, kl, wq, wk, mix, scale)
    else:  # "compile": the reference functions traced by torch.compile, autograd by inductor
        from crosshead import reference

        def eager(q, k, v, wq, wk):
            ql = reference.landmarks(q, list(grid), list(size), 0)
            kl = reference.landmarks(k, list(grid), list(size), 0)
            return reference.imhsa(q, k, v, ql, kl, wq, wk, mix, scale)[0]

        torch._dynamo.reset()  # one worker compiles every N and pass: start each from scratch
        compiled = torch.compile(eager, dynamic=False, fullgraph=True)

        def forward():
            return compiled(q, k, v, wq, wk)
    return Case(forward, [q, k, v, wq, wk], g, compiles=path == "compile")


def naive_imhsa(q, k, v, q_land, k_land, w_q=None, w_k=None, mix: str = "post", scale=None):
    """imhsa.md's core op written the obvious way, the yardstick of the pure-torch path:
    torch.softmax per side, einsum for the head mixing, @ for the products, autograd for the
    backward (which keeps the N×L maps instead of recomputing them). Float32 arithmetic for half
    inputs, as crosshead's."""
    dtype = q.dtype
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v, q_land, k_land = (t.to(ct) for t in (q, k, v, q_land, k_land))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s_k = (q_land * scale) @ k.transpose(-1, -2)  # (B, h, L, N)
    s_q = q @ (k_land * scale).transpose(-1, -2)  # (B, h, N, L)

    def mixed(w, x):
        return x if w is None else torch.einsum("gh,bhij->bgij", w.to(ct), x)

    if mix == "post":
        a_k, a_q = mixed(w_k, torch.softmax(s_k, -1)), mixed(w_q, torch.softmax(s_q, -1))
    else:
        a_k, a_q = torch.softmax(mixed(w_k, s_k), -1), torch.softmax(mixed(w_q, s_q), -1)
    return (a_q @ (a_k @ v)).to(dtype)


def _naive_case(cfg: Config, side: int) -> Case:
    """naive_imhsa on the inputs, landmarks and w of imhsa-torch, the landmarks computed as there."""
    import crosshead
    q, k, v, g = _qkv(cfg, side)
    wq, wk = _mixing(cfg, cfg.heads)
    grid, size, mix = (side, side), cfg.landmarks, cfg.mix
    if _imhsa_torch_path(cfg) == "function":
        def pool(x):
            return _ReferenceLandmarks.apply(x, list(grid), list(size))
    else:
        def pool(x):
            return crosshead.landmarks(x, grid, size)

    def forward():
        return naive_imhsa(q, k, v, pool(q), pool(k), wq, wk, mix)
    return Case(forward, [q, k, v, wq, wk], g)


def _imhsa_torch_path(cfg: Config) -> str:
    return "function" if (cfg.device == "cuda" and _fused_available()) else "api"


def _why_not_fused(cfg: Config) -> str | None:
    reason = _no_gpu(cfg)
    if reason:
        return reason
    from crosshead import _library
    if not _fused_available():
        return (f"no fused CUDA kernel loaded: crosshead backend is {_library.mode!r} "
                f"({_library.detail})")
    return None


def _why_not_compile(cfg: Config) -> str | None:
    if cfg.device == "cpu":
        import shutil
        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            return "torch.compile on CPU needs a C++ compiler (none on PATH)"
    return None
