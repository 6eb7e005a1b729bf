import torch


def rand(*shape, dtype=torch.float64, scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def imhsa_inputs(B, h, N, d, L, dtype=torch.float64, interaction=True, requires_grad=False, scale=1.0):
    """q, k, v, q_land, k_land, w_q, w_k with fresh random values (w near the identity)."""
    q, k, v = (rand(B, h, N, d, dtype=dtype, scale=scale, requires_grad=requires_grad) for _ in range(3))
    q_land, k_land = (rand(B, h, L, d, dtype=dtype, scale=scale, requires_grad=requires_grad) for _ in range(2))
    w = [None, None]
    if interaction:
        w = [(torch.eye(h, dtype=torch.float64) + 0.3 * torch.randn(h, h, dtype=torch.float64)).to(dtype)
             .requires_grad_(requires_grad) for _ in range(2)]
    return q, k, v, q_land, k_land, *w


def as64(tensors):
    return [None if t is None else t.detach().to(torch.float64).requires_grad_(t.requires_grad)
            for t in tensors]
