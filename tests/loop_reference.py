"""An independent float64 reference for the tests: explicit loops over batch and heads, written
from imhsa.md's equations, sharing no code with crosshead.reference. Differentiable through
torch.autograd, which gives the reference gradients."""

import torch


def pool_1d_bins(n_in, n_out):
    return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]


def landmarks(x, grid, size, prefix):
    """x (B, h, N, d) float64 -> (B, h, L, d), adaptive-average bins, prefix tokens skipped."""
    B, h, N, d = x.shape
    t = x[:, :, prefix:]
    rows = []
    if grid is None:
        for s, e in pool_1d_bins(N - prefix, size):
            rows.append(t[:, :, s:e].mean(2))
    else:
        H, W = grid
        t = t.reshape(B, h, H, W, d)
        for ys, ye in pool_1d_bins(H, size[0]):
            for xs, xe in pool_1d_bins(W, size[1]):
                rows.append(t[:, :, ys:ye, xs:xe].mean((2, 3)))
    return torch.stack(rows, 2)


def mixed_maps(q, k, q_land, k_land, w_q, w_k, mix, scale):
    """Per batch element b and head g: (Â_Q[b, g] (N×L), Â_K[b, g] (L×N)) as nested lists."""
    B, h = q.shape[:2]
    eye = torch.eye(h, dtype=q.dtype)
    w_q = eye if w_q is None else w_q
    w_k = eye if w_k is None else w_k
    a_q, a_k = [], []
    for b in range(B):
        s_q = [scale * q[b, j] @ k_land[b, j].T for j in range(h)]
        s_k = [scale * q_land[b, j] @ k[b, j].T for j in range(h)]
        row_q, row_k = [], []
        for g in range(h):
            if mix == "post":
                row_q.append(sum(w_q[g, j] * torch.softmax(s_q[j], -1) for j in range(h)))
                row_k.append(sum(w_k[g, j] * torch.softmax(s_k[j], -1) for j in range(h)))
            else:
                row_q.append(torch.softmax(sum(w_q[g, j] * s_q[j] for j in range(h)), -1))
                row_k.append(torch.softmax(sum(w_k[g, j] * s_k[j] for j in range(h)), -1))
        a_q.append(row_q)
        a_k.append(row_k)
    return a_q, a_k


def imhsa(q, k, v, q_land, k_land, w_q=None, w_k=None, mix="post", scale=None):
    """out[b, g] = Â_Q[b, g] · (Â_K[b, g] · v[b, g])."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    a_q, a_k = mixed_maps(q, k, q_land, k_land, w_q, w_k, mix, scale)
    B, h = q.shape[:2]
    return torch.stack([torch.stack([a_q[b][g] @ (a_k[b][g] @ v[b, g]) for g in range(h)])
                        for b in range(B)])
