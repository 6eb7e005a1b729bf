"""One forward and backward of the fused kernels at the target shape, for a profiler (bench/run_gpu.sh
runs it under ncu): B=32, h=8, N=3136 (56×56), d=64, L=49 (7×7), bfloat16, w_q and w_k given.

    python bench/profile_case.py [--mix post|pre] [--n 3136]
"""

import argparse
import math

import torch

import crosshead

ap = argparse.ArgumentParser()
ap.add_argument("--mix", default="post", choices=["post", "pre"])
ap.add_argument("--n", type=int, default=3136)
a = ap.parse_args()
B, h, d, side = 32, 8, 64, math.isqrt(a.n)
assert side * side == a.n, "--n must be a square grid"
q, k, v = (torch.randn(B, h, a.n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
ql, kl = (crosshead.landmarks(t, grid=(side, side), size=(7, 7)) for t in (q, k))
w = torch.eye(h, device="cuda") + 0.1 * torch.randn(h, h, device="cuda")
out = torch.ops.crosshead.imhsa(q, k, v, ql, kl, w, w, a.mix, d ** -0.5)
torch.ops.crosshead.imhsa_backward(torch.randn_like(q), q, k, v, ql, kl, w, w, *out[1:], a.mix, d ** -0.5)
torch.cuda.synchronize()
print("profile_case: done")
