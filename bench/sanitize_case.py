"""A small forward and backward of every kernel path, for compute-sanitizer (bench/run_gpu.sh):
float32 and bfloat16 (first and second generation), both mix modes, with and without interaction,
at shapes with partial tiles (cuda_audit.md §4)."""

import torch

import crosshead  # noqa: F401  (registers torch.ops.crosshead)

for B, h, N, d, L in ((1, 2, 37, 32, 5), (2, 4, 77, 40, 7), (2, 8, 131, 64, 49)):
    for dtype in (torch.float32, torch.bfloat16):
        for mix in ("post", "pre"):
            for w in (None, torch.eye(h, device="cuda") + 0.1 * torch.randn(h, h, device="cuda")):
                q, k, v = (torch.randn(B, h, N, d, device="cuda", dtype=dtype) for _ in range(3))
                ql, kl = (torch.randn(B, h, L, d, device="cuda", dtype=dtype) for _ in range(2))
                out = torch.ops.crosshead.imhsa(q, k, v, ql, kl, w, w, mix, d ** -0.5)
                torch.ops.crosshead.imhsa_backward(torch.randn_like(q), q, k, v, ql, kl, w, w, *out[1:], mix,
                                                   d ** -0.5)
torch.cuda.synchronize()
print("sanitize_case: done")
