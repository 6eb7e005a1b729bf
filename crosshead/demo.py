"""python -m crosshead.demo: run iMHSA and the module on whatever device is present, check the result
against the float64 pure-torch path, time it beside softmax attention, and say what happened."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import crosshead
from crosshead import _library, reference
from crosshead.info import report


def _timed(fn, device, repeats=5):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grid", type=int, default=56, help="token grid side (N = grid²)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(report(), "\n")

    B, h, d, grid, size = 2, 8, 64, (args.grid, args.grid), (7, 7)
    N, L = grid[0] * grid[1], size[0] * size[1]
    print(f"== imhsa on {device} ({dtype}): B={B}, h={h}, N={N} ({grid[0]}x{grid[1]} grid), d={d}, L={L}")
    q, k, v = (torch.randn(B, h, N, d, device=device, dtype=dtype) for _ in range(3))
    w_q, w_k = (torch.eye(h, device=device) + 0.1 * torch.randn(h, h, device=device) for _ in range(2))
    q_land, k_land = crosshead.landmarks(q, grid, size), crosshead.landmarks(k, grid, size)
    for mix in ("post", "pre"):
        out = crosshead.imhsa(q, k, v, q_land, k_land, w_q, w_k, mix=mix)
        inputs64 = [t.double().cpu() for t in (q, k, v, q_land, k_land, w_q, w_k)]
        expected = reference.imhsa(*inputs64, mix, d**-0.5)[0]
        err = (out.double().cpu() - expected).abs().max().item()
        t = _timed(lambda: crosshead.imhsa(q, k, v, q_land, k_land, w_q, w_k, mix=mix), device)
        print(f"mix={mix}: out {tuple(out.shape)}, max |error| vs float64 pure-torch {err:.2e}, "
              f"median forward {t * 1e3:.2f} ms")
    t_sdpa = _timed(lambda: F.scaled_dot_product_attention(q, k, v), device)
    print(f"softmax attention (SDPA) on the same q, k, v: median forward {t_sdpa * 1e3:.2f} ms")
    backend = "fused CUDA kernels" if device.type == "cuda" and _library.has_fused_cuda() else "pure-torch path"
    print(f"served by: {backend}")

    print(f"\n== InteractiveMultiheadAttention(dim={h * d}, heads={h}, landmarks={size}, "
          f"1 CLS token), forward + backward")
    module = crosshead.nn.InteractiveMultiheadAttention(h * d, h, landmarks=size, num_prefix_tokens=1).to(device)
    x = torch.randn(B, 1 + N, h * d, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        y = module(x, grid)
    y.float().square().mean().backward()
    grads = {n: p.grad.norm().item() for n, p in module.named_parameters()}
    print(f"y {tuple(y.shape)} {y.dtype}; gradient norms: "
          + ", ".join(f"{n} {g:.3g}" for n, g in grads.items()))
    ok = all(torch.isfinite(torch.tensor(list(grads.values()))))
    print("all gradients finite" if ok else "NON-FINITE GRADIENTS")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
