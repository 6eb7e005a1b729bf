"""FLOPs and bytes per contender, for the roofline columns.

These are *model* counts of one forward, not measurements: FLOPs count each multiply-add as 2;
bytes are the traffic an ideal implementation of the contender's algorithm cannot avoid (inputs
read once, outputs written once, plus every intermediate that algorithm must materialise, such as
the N×N maps of math SDPA and Talking-Heads, each written once and read once per pass over it).
A forward+backward is counted as FWDBWD_FLOPS × the attention FLOPs (the FlashAttention
convention: backward = 2.5 × forward, because the maps are recomputed) plus 3 × the projection
FLOPs, and the bytes as forward bytes + the backward's reads of the forward inputs and dout and its
writes of the input gradients. The roofline time is max(FLOPs / matmul rate, bytes / copy
bandwidth), both measured in the same run (bench/machine.py), and the fraction reported is roofline
time / measured median time.
"""

from __future__ import annotations

from .config import Config, element_size

FWDBWD_FLOPS = 3.5


def _shape(cfg: Config, n: int):
    return cfg.batch, cfg.heads, n, cfg.head_dim, element_size(cfg.dtype)


# --------------------------------------------------------------------- attention cores (op level)


def imhsa_core(cfg: Config, n: int, mixing: bool = True):
    """landmarks(q), landmarks(k) then imhsa: 4 N·L·d-sized matmuls per head (S_K, S_Q, Â_K·v,
    Â_Q·Z), the (h, h) mixing of both N×L maps, and the two poolings. Bytes: the poolings read q
    and k, the op reads q, k, v and writes out (imhsa.md, "Costs to hold the kernels to")."""
    B, h, N, d, e = _shape(cfg, n)
    L = cfg.num_landmarks
    flops = B * h * (8 * N * L * d + (4 * N * L * h if mixing else 0) + 2 * N * d)
    return flops, 6 * B * h * N * d * e, 7 * B * h * N * d * e


def sdpa_core(cfg: Config, n: int, materialises: bool):
    """Softmax attention: 4·N²·d FLOPs per head. A fused kernel (flash, efficient, cudnn) moves
    only q, k, v and out; the math backend also writes and reads the scores and probabilities."""
    B, h, N, d, e = _shape(cfg, n)
    flops = 4 * B * h * N * N * d
    io = 4 * B * h * N * d * e
    maps = 4 * B * h * N * N * e if materialises else 0
    bwd = (8 * B * h * N * d * e) + (6 * B * h * N * N * e if materialises else 0)
    return flops, io + maps, bwd


# ------------------------------------------------------------------ modules (x → qkv → core → proj)


def _projections(cfg: Config, n: int):
    """qkv and output Linear layers of a (B, N, dim) module: 8·N·dim² FLOPs; bytes: x, qkv (written
    and read), the core's output (written and read), the module's output, and the weights."""
    B, N, C, e = cfg.batch, n, cfg.dim, element_size(cfg.dtype)
    return 8 * B * N * C * C, (10 * B * N * C + 4 * C * C) * e


def module_cost(cfg: Config, n: int, core: str):
    """(forward FLOPs, forward bytes, backward bytes) of a module-level contender."""
    B, h, N, d, e = _shape(cfg, n)
    pf, pb = _projections(cfg, n)
    L = cfg.num_landmarks
    if core == "imhsa":
        cf, _, _ = imhsa_core(cfg, n)
        cb = 2 * B * h * N * d * e  # the landmark pass re-reads q and k
    elif core == "sdpa":
        cf, cb = 4 * B * h * N * N * d, 0
    elif core == "talking_heads":
        # q·kᵀ, two h×h mixes of the N×N maps (proj_l, proj_w), softmax, ·v; timm materialises
        # the map about four times over (logits, mixed logits, probabilities, mixed probabilities)
        cf = 4 * B * h * N * N * d + 4 * B * N * N * h * h
        cb = 8 * B * h * N * N * e
    elif core == "performer":
        m = cfg.performer_features or _performer_default(d)
        cf = 8 * B * h * N * m * d
        cb = 4 * B * h * N * m * e
    elif core == "nystrom":
        m = cfg.nystrom_landmarks or L
        cf = B * h * (8 * N * m * d + 2 * N * m * m + 48 * m ** 3 + 2 * N * d * 33)
        cb = 8 * B * h * N * m * e
    elif core == "linformer":
        k = cfg.linformer_k
        cf = 8 * B * N * k * cfg.dim
        cb = 4 * B * h * N * k * e
    else:
        raise ValueError(core)
    fwd_bytes = pb + cb
    bwd_bytes = pb + cb + 2 * B * N * cfg.dim * e  # reads x and dout, writes dx (+ re-reads)
    return pf + cf, fwd_bytes, bwd_bytes, pf


def _performer_default(d: int) -> int:
    import math
    return int(d * math.log(d))


def cost(cfg: Config, n: int, kind: tuple, pass_: str):
    """(FLOPs, bytes) of one pass of a contender whose cost kind is ("op", core, …) or
    ("module", core)."""
    if kind[0] == "op":
        if kind[1] == "imhsa":
            f, fb, bb = imhsa_core(cfg, n)
        else:
            f, fb, bb = sdpa_core(cfg, n, materialises=kind[1] == "sdpa_math")
        return (f, fb) if pass_ == "fwd" else (FWDBWD_FLOPS * f, fb + bb)
    f, fb, bb, proj = module_cost(cfg, n, kind[1])
    if pass_ == "fwd":
        return f, fb
    return FWDBWD_FLOPS * (f - proj) + 3 * proj, fb + bb
